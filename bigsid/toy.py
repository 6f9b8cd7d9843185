"""Analytic ground truth: a Gaussian-mixture teacher whose exact denoiser is closed form.

For prompt p the data is sum_k w_pk N(mu_pk, std^2 I) in latent shape; the empty prompt is the mixture over all
prompts, so classifier-free guidance of the exact teacher is exact too. Under x_t = a x0 + s eps each component
stays Gaussian, N(a mu, v I) with v = a^2 std^2 + s^2, and

    E[x0 | x_t] = sum_m r_m(x_t) * (s^2 / v * mu_m + a std^2 / v * x_t),   r_m ∝ w_m N(x_t; a mu_m, v I).

The same truth scores one-step samples (Frechet distance, mode frequencies) and the teacher's own sampler. The
teacher distilled is the exact denoiser itself or, by default, a small network fitted to it (TeacherConfig).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch import nn

from bigsid.config import GMMConfig
from bigsid.diffusion import SD_SCHEDULER_CONFIG, VPSchedule
from bigsid.models import Cond, predict

TRUTH_FILE = "bigsid_toy.json"
log = logging.getLogger("bigsid.toy")


@dataclass
class GMM:
    means: torch.Tensor  # [P, K, D]
    weights: torch.Tensor  # [P, K], rows sum to 1
    std: float
    latent_shape: list[int]
    prompts: list[str]

    @classmethod
    def from_config(cls, cfg: GMMConfig) -> "GMM":
        gen = torch.Generator().manual_seed(cfg.seed)
        dim = math.prod(cfg.latent_shape)
        means = torch.randn(cfg.num_prompts, cfg.modes_per_prompt, dim, generator=gen)
        weights = torch.full((cfg.num_prompts, cfg.modes_per_prompt), 1.0 / cfg.modes_per_prompt)
        prompts = [f"toy prompt {p}" for p in range(cfg.num_prompts)]
        return cls(means, weights, cfg.mode_std, list(cfg.latent_shape), prompts)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def save(self, folder: str | Path) -> None:
        Path(folder, TRUTH_FILE).write_text(json.dumps({
            "means": self.means.tolist(), "weights": self.weights.tolist(), "std": self.std,
            "latent_shape": self.latent_shape, "prompts": self.prompts}))

    @classmethod
    def load(cls, folder: str | Path) -> "GMM | None":
        path = Path(folder, TRUTH_FILE)
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        return cls(torch.tensor(d["means"]), torch.tensor(d["weights"]), d["std"], d["latent_shape"], d["prompts"])

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact samples [B, *latent_shape] for prompt indices [B] (P: the all-prompt mixture), and their modes
        as flat component indices p * K + k."""
        num_prompts, k = self.weights.shape
        flat = torch.multinomial(self.log_prior(index).exp(), 1, generator=generator)[:, 0]
        x = self.means.flatten(0, 1)[flat] + self.std * torch.randn(len(index), self.dim, generator=generator)
        return x.view(len(index), *self.latent_shape), flat

    def __post_init__(self):
        num_prompts, k = self.weights.shape
        own = torch.full((num_prompts, num_prompts * k), -math.inf)
        for p in range(num_prompts):
            own[p, p * k:(p + 1) * k] = self.weights[p].log()
        everything = (self.weights / num_prompts).log().flatten()
        self.log_prior_table = torch.cat([own, everything[None]])  # row P: the empty prompt

    def log_prior(self, index: torch.Tensor) -> torch.Tensor:
        """[B, P*K] log weights of every component given the prompt index (P: the all-prompt mixture)."""
        return self.log_prior_table.to(index.device)[index]

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, index: torch.Tensor):
        """E[x0 | x_t] for x_t [B, D] and a, s [B, 1]; differentiable in x_t."""
        mu = self.means.flatten(0, 1).to(x_t)  # [M, D]
        v = a.square() * self.std ** 2 + s.square()
        sq = x_t.square().sum(1, keepdim=True) - 2 * a * x_t @ mu.T + a.square() * mu.square().sum(1)[None]
        r = torch.softmax(self.log_prior(index).to(x_t) - sq / (2 * v), dim=1)
        return s.square() / v * (r @ mu) + a * self.std ** 2 / v * x_t

    def nearest_mode(self, x: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest of `prompt`'s modes for each sample."""
        return torch.cdist(x.flatten(1).double(), self.means[prompt].double()).min(1)


class GMMDenoiser(nn.Module):
    """The exact x0-prediction of a GMM; conditioning is VocabEncoder's one-hot prompt index."""

    prediction_type = "sample"

    def __init__(self, truth: GMM, schedule: VPSchedule):
        super().__init__()
        self.truth = truth
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        a, s = self.schedule.coeffs(t, 2)
        x0 = self.truth.posterior_mean(x_t.flatten(1).float(), a, s, emb.argmax(-1))
        return x0.view_as(x_t).to(x_t.dtype)


class VocabEncoder(nn.Module):
    """Prompt -> one-hot over the toy vocabulary plus the empty prompt (the toy's 'text encoder')."""

    def __init__(self, prompts: list[str]):
        super().__init__()
        self.prompts = list(prompts)
        self.register_buffer("uncond", torch.eye(len(prompts) + 1)[-1:], persistent=False)

    def forward(self, prompts: list[str]) -> Cond:
        lookup = {p: i for i, p in enumerate(self.prompts)} | {"": len(self.prompts)}
        unknown = [p for p in prompts if p not in lookup]
        if unknown:
            raise ValueError(f"prompts {unknown[:3]} are not in the toy vocabulary {self.prompts}")
        index = torch.tensor([lookup[p] for p in prompts], device=self.uncond.device)
        return Cond(nn.functional.one_hot(index, len(self.prompts) + 1).float(), self.uncond)


class MLPDenoiser(nn.Module):
    """Small v-prediction MLP on flattened latents: the trainable network of the toy_gmm teacher.

    v-prediction is EDM's preconditioning with sigma_data = 1 on a VP schedule (x0 = a x_t - s v; the toy data
    has rms ~1): x0 and its input-Jacobian stay O(1) in the network's output at every t. With eps-prediction,
    x0 = (x_t - s eps) / a magnifies the fake score's error and Jacobian error by up to 1/a ~ 15 at large t,
    and SiD and SIM differentiate through that Jacobian (DMD does not); the generator at t_init = 625 also had to
    cancel 2.5 z to within the mode width. Measured on configs/toy_sid.yaml with the exact teacher, 1,000
    iterations: FD 0.24 with eps-, 0.13 with v-prediction, and 24% -> 49% of samples within 0.6 of a true mode."""

    prediction_type = "v_prediction"

    def __init__(self, dim: int, cond_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), 16)), persistent=False)
        layers, d_in = [], dim + 32 + cond_dim
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            d_in = width
        self.body = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        phase = (t.float() / 1000)[:, None] * self.freqs[None]
        h = torch.cat([x_t.flatten(1), phase.sin(), phase.cos(), emb.to(x_t.dtype)], dim=1)
        return self.body(h).view_as(x_t)


def fit_denoiser(net: nn.Module, encoder: nn.Module, truth: GMM, schedule: VPSchedule, steps: int,
                 batch: int = 512, lr: float = 2e-3, seed: int = 0, log_every: int = 0) -> float:
    """Regress `net`'s v-prediction onto the exact GMM denoiser's; returns the final loss.

    Regression onto the exact E[v | x_t] has far less variance than denoising score matching, so a few
    thousand steps give a teacher whose error is small against the mode width. The v error is the x0 error
    divided by s_t (EDM's weighting with sigma_data = 1); the eps error weighs it by a_t / s_t, 20,000 times
    less in square at t = 979 than at t = 20, and left the large-t x0-prediction, which holds the mode weights,
    0.16 rms off per element (0.02 in v, the same 1,500 steps of configs/toy_sid.yaml)."""
    if steps <= 0:
        return float("nan")
    exact, prompts = GMMDenoiser(truth, schedule), truth.prompts + [""]
    one_hot = torch.eye(len(prompts))
    with torch.no_grad():
        table = encoder(prompts).emb  # text is encoded once; each step indexes it
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        index = torch.randint(0, len(prompts), (batch,), generator=gen)
        x0, _ = truth.sample(index, gen)
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=gen)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        with torch.no_grad():
            target = predict(exact, schedule, x_t, t, Cond(one_hot[index], one_hot[-1:]), out="v_prediction")
        cond = Cond(table[index], table[-1:])
        loss = (predict(net, schedule, x_t, t, cond, out="v_prediction") - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # after the step: the fitted network leaves with no gradients
        sched.step()
        if log_every and step % log_every == 0:
            log.info("fit step %d/%d: v mse %.5f", step, steps, loss.item())
    return loss.item()


# ---- ground-truth metrics ----

def frechet_from_stats(mu_x: np.ndarray, c_x: np.ndarray, mu_y: np.ndarray, c_y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2)): the Frechet distance of two Gaussians, here and in
    evaluation/'s FID. A numerically singular product gets 1e-6 added to both diagonals, as clean-fid does."""
    covmean = scipy.linalg.sqrtm(c_x @ c_y)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(c_x)) * 1e-6
        covmean = scipy.linalg.sqrtm((c_x + offset) @ (c_y + offset))
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(c_x) + np.trace(c_y) - 2 * np.trace(covmean.real))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The Frechet distance between the Gaussians fitted to two sample sets [N, ...]."""
    x, y = x.flatten(1).double().cpu().numpy(), y.flatten(1).double().cpu().numpy()
    return frechet_from_stats(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def mode_scores(x: torch.Tensor, truth: GMM, prompt: int, mass: float = 0.999) -> tuple[float, float]:
    """(mode_coverage_tv, off_mode_fraction) of samples x of `prompt`.

    TV: total variation between the frequencies of the nearest true modes and the true weights. Off-mode: the
    fraction of samples farther from every true mode than the radius holding `mass` of one mode's samples
    (std * sqrt(chi2_D quantile)): the bridges between modes that a continuous one-step map leaves, which
    mode frequencies do not show and a small Frechet distance hardly sees."""
    distance, mode = truth.nearest_mode(x, prompt)
    freq = torch.bincount(mode, minlength=truth.weights.shape[1]).double() / len(x)
    radius = truth.std * math.sqrt(scipy.stats.chi2.ppf(mass, truth.dim))
    return (0.5 * (freq - truth.weights[prompt].double()).abs().sum().item(),
            (distance > radius).double().mean().item())


@torch.no_grad()
def sample_generator(generator: nn.Module, encoder: nn.Module, prompt: str, n: int, shape, seed: int,
                     batch: int = 1000) -> torch.Tensor:
    device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn(m, *shape, generator=gen).to(device)
        out.append(generator(z, encoder([prompt] * m).emb).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_teacher(teacher: nn.Module, schedule: VPSchedule, scheduler_config: dict, encoder: nn.Module, prompt: str,
                   n: int, shape, steps: int, seed: int, guidance: float = 1.0) -> torch.Tensor:
    """The teacher's own multi-step DDIM sampler (diffusers' DDIMScheduler); returns the last x0-prediction."""
    from diffusers import DDIMScheduler

    device = schedule.a.device
    scheduler = DDIMScheduler.from_config({**scheduler_config, "clip_sample": False})
    scheduler.set_timesteps(steps)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    cond = encoder([prompt] * n)
    x0 = x
    for t in scheduler.timesteps:
        eps = predict(teacher, schedule, x, t.expand(n).to(device), cond, guidance, out="epsilon")
        step = scheduler.step(eps, t, x)
        x, x0 = step.prev_sample, step.pred_original_sample
    return x0.float().cpu()


# the metric names of toy_metrics.json: (FD, mode TV, off-mode fraction) of each sample set
SCORE_KEYS = {"generator": ("fd_generator", "mode_coverage_tv", "off_mode_fraction"),
              "teacher_sampler": ("fd_teacher_sampler", "mode_coverage_tv_teacher_sampler",
                                  "off_mode_fraction_teacher_sampler")}


def evaluate(generator: nn.Module, encoder: nn.Module, truth: GMM, num_samples: int, seed: int = 0,
             teacher_samples: dict[str, torch.Tensor] | None = None) -> dict:
    """Frechet distance and mode coverage of one-step samples against exact samples, per prompt and mean."""
    gen = torch.Generator().manual_seed(seed + 1)
    rows: dict[str, list[float]] = {}
    for p, prompt in enumerate(truth.prompts):
        index = torch.full((num_samples,), p)
        exact, _ = truth.sample(index, gen)
        exact2, _ = truth.sample(index, gen)
        x = sample_generator(generator, encoder, prompt, num_samples, truth.latent_shape, seed + 100 + p)
        scored = [(SCORE_KEYS["generator"], x)]
        if teacher_samples is not None:
            scored.append((SCORE_KEYS["teacher_sampler"], teacher_samples[prompt]))
        for keys, samples in scored:
            for key, value in zip(keys, (frechet_distance(samples, exact), *mode_scores(samples, truth, p))):
                rows.setdefault(key, []).append(value)
        rows.setdefault("fd_reference", []).append(frechet_distance(exact2, exact))
    metrics = {"num_samples": num_samples, "fd_generator_per_prompt": rows["fd_generator"]}
    metrics |= {key: float(np.mean(values)) for key, values in rows.items()}
    return metrics


# ---- a small Stable Diffusion pipeline fitted to a GMM: the full diffusers path against a known truth ----

def byte_level_clip_tokenizer(folder: Path, max_length: int = 32):
    """A CLIPTokenizer whose vocabulary is the 256 byte symbols (plus their end-of-word forms), no merges.

    The real CLIP BPE vocabulary is large and not downloadable offline; byte-level coverage means every prompt
    tokenizes, which is all a tiny test teacher needs."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def build_toy_pipeline(truth: GMM, seed: int = 0):
    """A tiny randomly initialised StableDiffusionPipeline whose latents have the GMM's shape."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    channels, size, _ = truth.latent_shape
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_level_clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=size * 2)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def prepare_toy_teacher(folder: str | Path, gmm: GMMConfig, fit_steps: int = 3000, seed: int = 0) -> Path:
    """Fit a tiny SD pipeline's UNet to the exact GMM denoiser and save it as a diffusers folder with its truth."""
    from bigsid.models import CLIPPromptEncoder, UNetDenoiser

    folder = Path(folder)
    truth = GMM.from_config(gmm)
    pipe = build_toy_pipeline(truth, seed)
    schedule = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)
    encoder = CLIPPromptEncoder(pipe.tokenizer, pipe.text_encoder)
    loss = fit_denoiser(UNetDenoiser(pipe.unet, "epsilon"), encoder, truth, schedule, fit_steps, batch=128,
                        lr=1e-3, seed=seed, log_every=max(1, fit_steps // 10))
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    truth.save(partial)
    partial.rename(folder)  # a teacher folder exists only once it is complete
    log.info("toy teacher saved to %s (final v mse %.5f)", folder, loss)
    return folder


def write_report(run_dir: Path, metrics: dict) -> list[Path]:
    """RUN_DIR/eval/toy_metrics.json and a plot of fd_generator against training images (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy_metrics.json").write_text(json.dumps(metrics, indent=1))
    history = []
    log_path = Path(run_dir) / "metrics.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            row = json.loads(line)
            if "eval/fd_generator" in row:
                history.append((row["nimg"], row["eval/fd_generator"]))
    history = sorted(dict(history).items())
    fig, ax = plt.subplots(figsize=(6, 4))
    if history:
        ax.plot([h[0] for h in history], [h[1] for h in history], "o-", label="one-step generator (EMA)")
    for key, style, label in (("fd_teacher_sampler", "--", f"teacher, {metrics.get('teacher_sampler_steps')} DDIM steps"),
                              ("fd_reference", ":", "exact vs exact (noise floor)")):
        if key in metrics:
            ax.axhline(metrics[key], linestyle=style, color="gray" if key == "fd_reference" else "C1", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training images (nimg)")
    ax.set_ylabel("Frechet distance to exact samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fd_generator.png", dpi=100)
    plt.close(fig)
    return [out / "toy_metrics.json", out / "fd_generator.png"]
