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
from bigsid.diffusion import SD_SCHEDULER_CONFIG, FlowSchedule, Schedule, VPSchedule
from bigsid.models import predict, trailing_timesteps
from bigsid.text import Cond

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
        """E[x0 | x_t] for x_t [B, D] and a, s [B, 1], in x_t's dtype; differentiable in x_t."""
        mu, a, s = self.means.flatten(0, 1).to(x_t), a.to(x_t), s.to(x_t)  # mu: [M, D]
        v = a.square() * self.std ** 2 + s.square()
        sq = x_t.square().sum(1, keepdim=True) - 2 * a * x_t @ mu.T + a.square() * mu.square().sum(1)[None]
        r = torch.softmax(self.log_prior(index).to(x_t) - sq / (2 * v), dim=1)
        return s.square() / v * (r @ mu) + a * self.std ** 2 / v * x_t

    def moments(self, prompt: int) -> tuple[np.ndarray, np.ndarray]:
        """The mixture's exact mean and covariance for `prompt` (float64): sum_k w_k (m_k m_k^T + std^2 I) - mu mu^T."""
        m, w = self.means[prompt].double(), self.weights[prompt].double()
        mu = w @ m
        cov = (m * w[:, None]).T @ m - torch.outer(mu, mu) + self.std ** 2 * torch.eye(self.dim, dtype=torch.float64)
        return mu.numpy(), cov.numpy()

    def nearest_mode(self, x: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest of `prompt`'s modes for each sample."""
        return torch.cdist(x.flatten(1).double(), self.means[prompt].double()).min(1)


class GMMDenoiser(nn.Module):
    """The exact x0-prediction of a GMM; conditioning is VocabEncoder's one-hot prompt index. Called as any denoiser
    is, at the network's time (a flow schedule's is sigma * 1000, not the grid index), which it looks up."""

    prediction_type = "sample"

    def __init__(self, truth: GMM, schedule: Schedule):
        super().__init__()
        self.truth = truth
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        table = self.schedule.timesteps  # increasing, and the values the caller took from it
        a, s = self.schedule.coeffs(torch.searchsorted(table, timestep.to(table.dtype)), 2)
        x0 = self.truth.posterior_mean(x_t.flatten(1).to(torch.promote_types(x_t.dtype, torch.float32)), a, s,
                                       cond.emb.argmax(-1))
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
        # rows of the identity: one_hot would read the indices back to check their range, stalling the step
        return Cond(torch.eye(len(self.prompts) + 1, device=index.device)[index], uncond=Cond(self.uncond))


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

    def blocks(self) -> list[nn.Module]:
        """The layers: FSDP2's units and compile's regions (bigsid.families' denoisers name theirs alike)."""
        return [m for m in self.body if any(True for _ in m.parameters())]

    def stages(self) -> list[nn.Module]:
        return []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        phase = (t.float() / 1000)[:, None] * self.freqs[None]
        h = torch.cat([x_t.flatten(1), phase.sin(), phase.cos(), cond.emb.to(x_t.dtype)], dim=1)
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
        table = encoder(prompts)  # text is encoded once; each step indexes it
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
            target = predict(exact, schedule, x_t, t, Cond(one_hot[index], uncond=Cond(one_hot[-1:])),
                             out="v_prediction")
        cond = table[index]
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


def sample_moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.flatten(1).double().cpu().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(x: torch.Tensor, y: torch.Tensor | tuple[np.ndarray, np.ndarray]) -> float:
    """The Frechet distance between the Gaussian fitted to a sample set [N, ...] and that of another set, or one
    given by its (mean, covariance)."""
    return frechet_from_stats(*sample_moments(x), *(y if isinstance(y, tuple) else sample_moments(y)))


def mode_scores(x: torch.Tensor, truth: GMM, prompt: int, weights: torch.Tensor | None = None,
                mass: float = 0.999) -> dict:
    """What samples x of `prompt` say about its modes, each sample assigned to its nearest true mode:

    mode_weights: the share of samples per mode; mode_coverage_tv: their total variation from `weights` (the
    true mixture weights by default); off_mode_fraction: the share farther from every mode than the radius that
    holds `mass` of one mode's samples (std sqrt(chi2_D quantile)), i.e. outside every mode, whether as bridges
    between modes or as modes too wide; spread_ratio: the median distance to the nearest mode over its true value
    (std sqrt(chi2_D median)), 1 for exact samples, above 1 when modes come out too wide, below when too narrow;
    a median, so that samples bridging modes (under half of them) do not count as width; centre_offset: the
    distance from the mean of each mode's samples inside its radius to its true mean, in mode stds, averaged over
    the modes that have any (exact samples: ~sqrt(D / samples per mode), from sampling alone)."""
    distance, mode = truth.nearest_mode(x, prompt)
    freq = torch.bincount(mode, minlength=truth.weights.shape[1]).double() / len(x)
    weights = truth.weights[prompt].double() if weights is None else weights.double()
    radius = truth.std * math.sqrt(scipy.stats.chi2.ppf(mass, truth.dim))
    inside, flat = distance <= radius, x.flatten(1).double()
    offsets = [(flat[inside & (mode == k)].mean(0) - truth.means[prompt, k].double()).norm().item() / truth.std
               for k in range(truth.weights.shape[1]) if (inside & (mode == k)).any()]
    return {"mode_weights": freq.tolist(),
            "mode_coverage_tv": 0.5 * (freq - weights).abs().sum().item(),
            "off_mode_fraction": (~inside).double().mean().item(),
            "spread_ratio": distance.median().item() / (truth.std * math.sqrt(scipy.stats.chi2.ppf(0.5, truth.dim))),
            "centre_offset": sum(offsets) / len(offsets) if offsets else math.nan}


@torch.no_grad()
def sample_generator(generator: nn.Module, encoder: nn.Module, prompt: str, n: int, shape, seed: int,
                     batch: int = 1000) -> torch.Tensor:
    device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn(m, *shape, generator=gen).to(device)
        out.append(generator(z, encoder([prompt] * m)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_teacher(teacher: nn.Module, schedule: VPSchedule, scheduler_config: dict, encoder: nn.Module, prompt: str,
                   n: int, shape, steps: int, seed: int, guidance: float = 1.0) -> torch.Tensor:
    """The teacher's own multi-step DDIM sampler (diffusers' DDIMScheduler; for a flow teacher, the Euler sampler
    from pure noise at trailing grid times); returns the last x0-prediction."""
    from diffusers import DDIMScheduler

    device = schedule.a.device
    if isinstance(schedule, FlowSchedule):
        return _flow_euler(teacher, schedule, encoder([prompt] * n), n, shape, steps, seed, guidance)
    # fed the eps-prediction whatever the teacher predicts: a v-prediction config would read it as v
    scheduler = DDIMScheduler.from_config({**scheduler_config, "clip_sample": False, "prediction_type": "epsilon"})
    scheduler.set_timesteps(steps)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    cond = encoder([prompt] * n)
    x0 = x
    for t in scheduler.timesteps:
        eps = predict(teacher, schedule, x, t.expand(n).to(device), cond, guidance, out="epsilon")
        step = scheduler.step(eps, t, x)
        x, x0 = step.prev_sample, step.pred_original_sample
    return x0.float().cpu()


def _flow_euler(teacher, schedule, cond, n: int, shape, steps: int, seed: int, guidance: float) -> torch.Tensor:
    """x' = x + (sigma' - sigma) u, FlowMatchEulerDiscreteScheduler's step, written as DDIM's x' = a' x0 + s' eps
    (the same for a + s = 1), on the grid the schedule indexes; the last step lands on its x0-prediction."""
    device = schedule.a.device
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    times = trailing_timesteps(schedule.num_timesteps - 1, steps)
    for i, step_t in enumerate(times):
        t = torch.full((n,), step_t, device=device)
        x0 = predict(teacher, schedule, x, t, cond, guidance)
        if i + 1 < len(times):
            x = schedule.add_noise(x0, schedule.convert(x0, x, t, "sample", "epsilon"), torch.full_like(t, times[i + 1]))
    return x0.float().cpu()


def _key(metric: str, sample_set: str) -> str:
    """toy_metrics.json's names: fd_<set>; the generator's other metrics bare, the other sets' suffixed."""
    if metric == "fd":
        return f"fd_{sample_set}"
    return metric if sample_set == "generator" else f"{metric}_{sample_set}"


class GroundTruth:
    """What a toy run is scored against, built once per run: its sample sets never change.

    Every FD is to the reference's mean and covariance: the mixture's own (GMM.moments), exact, so that no reference
    sample's noise enters the comparison; for a guided run (guidance != 1, the teacher's kappa4), which has no
    closed form, those of the exact denoiser's guided sampler with eval.reference_steps steps. reference: an exact
    sample set (the guided sampler's), drawn in the plots; reference_b: another, whose FD (fd_reference) is the noise
    floor, what samples of the truth itself read at eval.num_samples. teacher_sampler: the
    distilled teacher's own multi-step sampler; exact_sampler: the exact denoiser through the same sampler with the
    same steps, guidance and noise, which tells how much of the teacher sampler's distance is the teacher's fit
    (a fit far worse is warned about) and how much the sampler's discretisation."""

    # a fitted teacher whose sampler is this many times farther from the truth than the exact denoiser's (plus
    # twice the noise floor, within which two samplers cannot be told apart) is a broken fit, not a teacher
    FIT_TOLERANCE = 2.0

    def __init__(self, networks, ev, guidance: float = 1.0):
        truth, schedule = networks.truth, networks.schedule
        self.truth, self.num_samples, self.guidance = truth, ev.num_samples, guidance
        self.teacher_sampler_steps = ev.teacher_sampler_steps
        exact = GMMDenoiser(truth, schedule)
        vocab = VocabEncoder(truth.prompts).to(schedule.a.device)

        def sampler(net, encoder, prompt, steps, seed):
            return sample_teacher(net, schedule, networks.scheduler_config, encoder, prompt, ev.num_samples,
                                  truth.latent_shape, steps, seed, guidance)

        gen = torch.Generator().manual_seed(1)
        self.sets: dict[str, dict[str, torch.Tensor]] = {"teacher_sampler": {}, "exact_sampler": {},
                                                         "reference": {}, "reference_b": {}}
        self.moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        weights = []
        for i, p in enumerate(truth.prompts):
            # the same noise for both samplers: their difference is the teacher's fit alone
            self.sets["teacher_sampler"][p] = sampler(networks.teacher, networks.encoder, p,
                                                      ev.teacher_sampler_steps, 10_000 + i)
            self.sets["exact_sampler"][p] = sampler(exact, vocab, p, ev.teacher_sampler_steps, 10_000 + i)
            if guidance == 1.0:
                index = torch.full((ev.num_samples,), i)
                a, b = truth.sample(index, gen)[0], truth.sample(index, gen)[0]
                weights.append(truth.weights[i].double())
            else:
                a, b = (sampler(exact, vocab, p, ev.reference_steps, seed) for seed in (20_000 + i, 30_000 + i))
                weights.append(torch.tensor(mode_scores(torch.cat([a, b]), truth, i)["mode_weights"]))
            self.sets["reference"][p], self.sets["reference_b"][p] = a, b
            self.moments[p] = truth.moments(i) if guidance == 1.0 else sample_moments(a)
        self.weights = torch.stack(weights)

    def score(self, generator: nn.Module, encoder: nn.Module, seed: int = 0) -> dict:
        """Frechet distance to the reference, mode weights, off-mode share and spread of the generator's one-step
        samples and of every fixed sample set, per prompt and as the mean over prompts."""
        rows: dict[str, list] = {}
        for i, prompt in enumerate(self.truth.prompts):
            x = sample_generator(generator, encoder, prompt, self.num_samples, self.truth.latent_shape,
                                 seed + 100 + i)
            reference = self.moments[prompt]
            for name, samples in (("generator", x), ("teacher_sampler", self.sets["teacher_sampler"][prompt]),
                                  ("exact_sampler", self.sets["exact_sampler"][prompt]),
                                  ("reference", self.sets["reference_b"][prompt])):
                values = {"fd": frechet_distance(samples, reference),
                          **mode_scores(samples, self.truth, i, self.weights[i])}
                for metric, value in values.items():
                    rows.setdefault(_key(metric, name), []).append(value)
        metrics = {"num_samples": self.num_samples, "guidance": self.guidance,
                   "teacher_sampler_steps": self.teacher_sampler_steps,
                   "fd_generator_per_prompt": rows["fd_generator"], "reference_mode_weights": self.weights.tolist()}
        metrics |= {k: (v if k.startswith("mode_weights") else float(np.mean(v))) for k, v in rows.items()}
        metrics["teacher_fit_ok"] = self.teacher_fit_ok(metrics)
        return metrics

    def teacher_fit_ok(self, metrics: dict) -> bool:
        bound = self.FIT_TOLERANCE * (metrics["fd_exact_sampler"] + metrics["fd_reference"])
        return metrics["fd_teacher_sampler"] <= bound

    def plot(self, path: Path, generator_samples: dict[str, torch.Tensor] | None = None,
             history: list[tuple[int, float]] = (), metrics: dict | None = None) -> Path:
        """Per prompt, the reference, the teacher's sampler and the generator projected on the plane through the
        prompt's mode means (their two leading principal directions), beside the generator's FD curve."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        prompts = self.truth.prompts
        fig, axes = plt.subplots(1, len(prompts) + 1, figsize=(3.6 * (len(prompts) + 1), 3.6), squeeze=False)
        for i, prompt in enumerate(prompts):
            means = self.truth.means[i].double()
            basis = _plane(means)
            ax = axes[0, i]
            shown = [("reference", self.sets["reference"][prompt], "0.6"),
                     (f"teacher, {self.teacher_sampler_steps} steps", self.sets["teacher_sampler"][prompt], "C1")]
            if generator_samples is not None:
                shown.append(("generator, 1 step", generator_samples[prompt], "C0"))
            for label, samples, color in shown:
                xy = (samples[:1000].flatten(1).double() - means.mean(0)) @ basis
                ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.4, color=color, label=label, rasterized=True)
            centres = (means - means.mean(0)) @ basis
            ax.scatter(centres[:, 0], centres[:, 1], marker="x", color="k", s=12, label="mode means")
            ax.set_title(prompt, fontsize=9)
            ax.set_aspect("equal", adjustable="datalim")
        axes[0, 0].legend(fontsize=7, markerscale=2, loc="best")
        draw_fd_curve(axes[0, -1], history, metrics or {})
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _plane(means: torch.Tensor) -> torch.Tensor:
    """[D, 2] orthonormal directions spanning the mode means' two leading principal directions; with fewer than
    three modes the plane is completed by the first coordinate axis orthogonal to them."""
    centred = means - means.mean(0)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=True)
    rank = int((sv > 1e-9 * max(float(sv.max()) if len(sv) else 0.0, 1e-30)).sum())
    directions = [vh[j] for j in range(min(rank, 2))]
    for axis in torch.eye(means.shape[1], dtype=means.dtype):
        if len(directions) == 2:
            break
        v = axis - sum((axis @ d) * d for d in directions) if directions else axis
        if v.norm() > 1e-6:
            directions.append(v / v.norm())
    return torch.stack(directions, dim=1)


# ---- a small Stable Diffusion pipeline fitted to a GMM: the full diffusers path against a known truth ----

def build_toy_pipeline(truth: GMM, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny randomly initialised StableDiffusionPipeline whose latents have the GMM's shape; prediction_type
    epsilon (SD 1.x) or v_prediction (SD 2.x)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bigsid.tiny import byte_level_clip_tokenizer

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
    scheduler = DDPMScheduler.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def prepare_toy_teacher(folder: str | Path, gmm: GMMConfig, fit_steps: int = 3000, seed: int = 0,
                        prediction_type: str = "epsilon", family: str = "sd", text_max_length: int = 0,
                        fit_lr: float = 1e-3) -> Path:
    """Fit a tiny pipeline of `family` to the exact GMM denoiser and save it as a diffusers folder with its truth:
    SD's (eps- or v-prediction, `prediction_type`) or bigsid.tiny's SDXL, PixArt or SD3 (flow). The fit goes
    through the loading code a real teacher goes through, on the folder as saved; `text_max_length` as
    teacher.text_max_length (a T5 family's runs must use the same); `fit_lr` the fit's peak learning rate (cosine
    decay over `fit_steps`)."""
    from bigsid.families import load_teacher
    from bigsid.tiny import build_pipeline

    folder = Path(folder)
    truth = GMM.from_config(gmm)
    pipe = (build_toy_pipeline(truth, seed, prediction_type) if family == "sd"
            else build_pipeline(family, tuple(truth.latent_shape), seed, prediction_type))
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    teacher = load_teacher(str(partial), text_max_length=text_max_length)
    loss = fit_denoiser(teacher.denoiser, teacher.encoder, truth, teacher.schedule, fit_steps, batch=128, lr=fit_lr,
                        seed=seed, log_every=max(1, fit_steps // 10))
    teacher.denoiser.network.save_pretrained(partial / teacher.family.network, safe_serialization=True)
    truth.save(partial)
    partial.rename(folder)  # a teacher folder exists only once it is complete
    log.info("toy teacher saved to %s (final v mse %.5f)", folder, loss)
    return folder


# the toy prompts ("toy prompt 0": 12 characters) are 14 T5 tokens with the word marker and </s>: 16 holds them, at
# a fraction of the cost of PixArt's 300 or SD3's 256
TOY_T5_LENGTH = 16


def prepare_family_teacher(folder: str | Path, gmm: GMMConfig, family: str, fit_steps: int, seed: int = 0,
                           fit_lr: float = 1e-3) -> list[str]:
    """Fit a toy teacher of `family` in `folder` (prepare_toy_teacher) and return the overrides that distil it by
    the family's conventions. The VP families (sd, sdxl, pixart) are fitted as v-prediction networks, EDM's
    preconditioning (MLPDenoiser says why): an eps-prediction network's x0 error at the last timestep is its eps
    error over a_t, 1 / 0.0064 on PixArt's linear betas. Their generator starts at SiD's t_init 625 (VE sigma 2.5
    on SD's betas); the flow family (sd3) predicts its velocity and starts from pure noise at 999, where its
    sampler starts."""
    flow = family == "sd3"
    text = TOY_T5_LENGTH if family in ("pixart", "sd3") else 0
    prepare_toy_teacher(folder, gmm, fit_steps=fit_steps, seed=seed, family=family, text_max_length=text,
                        prediction_type="epsilon" if flow else "v_prediction", fit_lr=fit_lr)
    return ["teacher.kind=diffusers", f"teacher.path={folder}", f"generator.t_init={999 if flow else 625}",
            *([f"teacher.text_max_length={text}"] if text else [])]


def _evaluations(run_dir: Path) -> list[dict]:
    """Every ground-truth evaluation a run logged, in order of nimg, keyed as its metrics (without "eval/")."""
    rows = {}
    log_path = Path(run_dir) / "metrics.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a run still writing
                continue
            if "eval/fd_generator" in row:
                rows[row["nimg"]] = {k.removeprefix("eval/"): v for k, v in row.items()}
    return [rows[nimg] for nimg in sorted(rows)]


def fd_history(run_dir: Path) -> list[tuple[int, float]]:
    """(nimg, generator FD) of every evaluation a run logged, in order of nimg."""
    return [(row["nimg"], row["fd_generator"]) for row in _evaluations(run_dir)]


# the mode weights may be this much farther (in total variation) from the reference's than the teacher sampler's:
# two sets of 1,000 exact samples of three equal modes differ by TV ~0.02 themselves
TV_SLACK = 0.01


def reaches_teacher(metrics: dict) -> bool:
    """The distillation target: the one-step generator at or below the teacher sampler's FD, with mode weights
    within its TV + TV_SLACK."""
    return (metrics["fd_generator"] <= metrics["fd_teacher_sampler"]
            and metrics["mode_coverage_tv"] <= metrics["mode_coverage_tv_teacher_sampler"] + TV_SLACK)


def held_since(run_dir: Path) -> tuple[int, int] | None:
    """(step, evaluations) of the run's last unbroken stretch of evaluations that meet the target, up to its last
    one; None where the last evaluation misses. Reaching the target once and losing it is not distillation."""
    stretch = None
    for row in _evaluations(run_dir):
        if reaches_teacher(row):
            stretch = (row["step"], 1) if stretch is None else (stretch[0], stretch[1] + 1)
        else:
            stretch = None
    return stretch


def summary(metrics: dict) -> str:
    """The console table of a toy evaluation: every sample set's numbers side by side."""
    sets = (("generator", "generator, 1 step"),
            ("teacher_sampler", f"teacher, {metrics.get('teacher_sampler_steps')} steps"),
            ("exact_sampler", f"exact denoiser, {metrics.get('teacher_sampler_steps')} steps"),
            ("reference", "reference (noise floor)"))
    rows = [("FD to the reference", "fd"), ("mode weights TV", "mode_coverage_tv"),
            ("outside every mode", "off_mode_fraction"), ("spread / true spread", "spread_ratio"),
            ("mode centres off (std)", "centre_offset")]
    width = max(len(label) for _, label in sets)
    lines = [f"{'':22}" + "".join(f"{label:>{width + 2}}" for _, label in sets)]
    for title, metric in rows:
        cells = (metrics.get(_key(metric, name)) for name, _ in sets)
        lines.append(f"{title:22}" + "".join(f"{'' if v is None else f'{v:.4f}':>{width + 2}}" for v in cells))
    if metrics.get("guidance", 1.0) != 1.0:
        lines.append(f"guided at {metrics['guidance']}: the reference is the exact denoiser's "
                     "guided sampler, not the unguided mixture")
    steps = metrics.get("teacher_sampler_steps")
    lines.append(f"target {'REACHED' if reaches_teacher(metrics) else 'NOT reached'}: one-step FD "
                 f"{metrics['fd_generator']:.4f} against the teacher's {steps}-step {metrics['fd_teacher_sampler']:.4f} "
                 f"(noise floor {metrics['fd_reference']:.4f}), mode weights TV {metrics['mode_coverage_tv']:.4f} "
                 f"against {metrics['mode_coverage_tv_teacher_sampler']:.4f} + {TV_SLACK}")
    if "teacher_fit_ok" in metrics and not metrics["teacher_fit_ok"]:
        lines.append("warning: the teacher's sampler is far from the exact denoiser's: a poor teacher fit, so "
                     "reaching it says little")
    return "\n".join(lines)


def draw_fd_curve(ax, history: list[tuple[int, float]], metrics: dict) -> None:
    """The generator's FD against images seen (log scale), with the fixed sample sets' FDs as lines."""
    if history:
        ax.plot([h[0] for h in history], [h[1] for h in history], "o-", ms=3, label="one-step generator (EMA)")
    steps = metrics.get("teacher_sampler_steps")
    for key, style, label, color in (("fd_teacher_sampler", "--", f"teacher, {steps} DDIM steps", "C1"),
                                     ("fd_exact_sampler", "-.", f"exact denoiser, {steps} DDIM steps", "C2"),
                                     ("fd_reference", ":", "exact samples (noise floor)", "gray")):
        if key in metrics:
            ax.axhline(metrics[key], linestyle=style, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training images (nimg)")
    ax.set_ylabel("Frechet distance to the reference")
    if history or metrics:
        ax.legend(fontsize=7)


def write_report(run_dir: Path, metrics: dict) -> list[Path]:
    """RUN_DIR/eval/toy_metrics.json and a plot of fd_generator against training images (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy_metrics.json").write_text(json.dumps(metrics, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_fd_curve(ax, fd_history(run_dir), metrics)
    fig.tight_layout()
    fig.savefig(out / "fd_generator.png", dpi=100)
    plt.close(fig)
    return [out / "toy_metrics.json", out / "fd_generator.png"]
