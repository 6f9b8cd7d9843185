"""SiD, Score identity Distillation (Zhou et al., ICML 2024, arXiv 2404.04057), with SiD-LSG guidance.

Generator loss per sample (paper eq. for L_theta with the MESM weighting):
    delta = f_phi(x_t) - f_psi(x_t)
    L     = w * sum_pixels  delta * ((f_phi - x_gen) - alpha * delta)
          = w * sum_pixels  delta * (f_psi - x_gen)                 for alpha = 1
with w = 1 / stopgrad(mean |x_gen - f_phi|). Only w is detached.
"""

from __future__ import annotations

from bigsid.models import predict
from bigsid.objectives.base import Objective, per_sample_sum, upcast


class SiD(Objective):
    def generator_loss(self, teacher, fake_score, x_gen, cond, t=None, eps=None):
        t, eps, x_t = self.noise(x_gen, t, eps)
        f_phi, f_psi = self.scores(teacher, fake_score, x_t, t, cond)
        # kappa3 guides f_psi in the alpha term; one more call only when it differs from kappa2
        f_psi3 = f_psi if self.cfg.kappa3 == self.cfg.kappa2 else upcast(
            predict(fake_score, self.schedule, x_t, t, cond, self.cfg.kappa3))
        x_gen = upcast(x_gen)
        w = self.sid_weight(x_gen, f_phi)
        # kappa2 guides f_psi in delta, kappa3 in the alpha term (equal in every released model).
        delta = f_phi - f_psi
        loss = w * per_sample_sum(delta * ((f_phi - x_gen) - self.cfg.alpha * (f_phi - f_psi3)))
        return loss, {"generator/loss": loss.detach(), "generator/weight": w,
                      "generator/delta_rms": delta.detach().square().flatten(1).mean(1).sqrt()}
