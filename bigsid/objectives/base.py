"""What every objective shares: the time/noise draw and the fake score's denoising loss.

Notation: teacher f_phi, fake score f_psi, both read as x0-predictions; x_gen = G(z, c);
x_t = a_t x_gen + s_t eps; kappa1..kappa4 are SiD-LSG's guidance scales.
"""

from __future__ import annotations

import torch
from torch import nn

from bigsid.config import ObjectiveConfig
from bigsid.diffusion import VPSchedule
from bigsid.models import Cond, predict

Metrics = dict[str, torch.Tensor]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 network outputs are combined in fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch: the reference code sums pixels, then divides by the batch."""
    return x.flatten(1).sum(1)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class Objective:
    """Base: fake-score denoising score matching; subclasses define the generator loss."""

    def __init__(self, cfg: ObjectiveConfig, schedule: VPSchedule):
        self.cfg = cfg
        self.schedule = schedule

    @property
    def prompt_drop(self) -> float:
        """Empty-prompt rate for the fake-score phase: only a guided fake score needs unconditional data.

        Guidance evaluates eps(x_t, "") of the network it guides. The fake score is guided by kappa1 (its own
        training), kappa2 (delta) and kappa3 (SiD's alpha term), so any of them != 1 needs it to learn the empty
        prompt. kappa4 guides the teacher, which knows the empty prompt already: DMD's teacher-only guidance
        trains its fake score on the prompts as given. (SiD-LSG's released models share one kappa, so there the
        drop is on whenever any kappa is.)"""
        c = self.cfg
        guided = any(k != 1.0 for k in (c.kappa1, c.kappa2, c.kappa3))
        return c.prompt_drop if guided else 0.0

    def noise(self, x_gen: torch.Tensor, t: torch.Tensor | None, eps: torch.Tensor | None):
        """t ~ U{t_min..t_max} and eps ~ N(0, I) unless given (tests pin them), and x_t."""
        if t is None:
            t = self.schedule.sample_t(x_gen.shape[0], self.cfg.t_min, self.cfg.t_max, x_gen.device)
        if eps is None:
            eps = torch.randn_like(x_gen)
        return t, eps, self.schedule.add_noise(x_gen, eps, t)

    def fake_score_loss(self, fake_score: nn.Module, x_gen: torch.Tensor, cond: Cond,
                        t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        """|| eps_psi^kappa1(x_t, t, c) - eps ||^2 on detached generator samples: no time weight (SiD-LSG), or
        EDM's lambda(sigma) on the x0 error, which is (sigma^2 + sigma_data^2) / sigma_data^2 on the eps error
        (x0 error = sigma * eps error at fixed x_t, sigma = s_t / a_t)."""
        t, eps, x_t = self.noise(x_gen.detach(), t, eps)
        eps_hat = predict(fake_score, self.schedule, x_t, t, cond, self.cfg.kappa1, out="epsilon")
        loss = per_sample_sum((upcast(eps_hat) - upcast(eps)).square())
        if self.cfg.fake_score_weighting == "edm":
            a, s = self.schedule.coeffs(t, 1)
            loss = loss * ((s / a).square() + self.cfg.sigma_data ** 2).flatten() / self.cfg.sigma_data ** 2
        return loss, {"fake_score/loss": loss.detach()}

    def generator_loss(self, teacher: nn.Module, fake_score: nn.Module, x_gen: torch.Tensor, cond: Cond,
                       t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    def scores(self, teacher, fake_score, x_t, t, cond):
        """f_phi^kappa4 and f_psi^kappa2.

        Parameters of both networks are frozen by the caller; their inputs keep the graph, so the generator
        gradient flows through x_t into both, as SiD and SIM require."""
        f_phi = predict(teacher, self.schedule, x_t, t, cond, self.cfg.kappa4)
        f_psi = predict(fake_score, self.schedule, x_t, t, cond, self.cfg.kappa2)
        return upcast(f_phi), upcast(f_psi)

    @staticmethod
    def sid_weight(x_gen: torch.Tensor, f_phi: torch.Tensor) -> torch.Tensor:
        """w = 1 / stopgrad(mean |x_gen - f_phi|) per sample, clipped below at 1e-5 (SiD, DMD)."""
        return 1.0 / per_sample_mean((x_gen - f_phi).abs()).detach().clamp_min(1e-5)
