"""DMD / DMD2 distribution matching (Yin et al. 2024), the baseline objective.

grad = (f_psi - f_phi) / mean |x_gen - f_phi| under no_grad; loss = 0.5 * || x_gen - stopgrad(x_gen - grad) ||^2,
whose gradient in x_gen is exactly `grad`. Nothing backpropagates through teacher or fake score.
Teacher guidance is kappa4 (DMD2: 1.75 for SD1.5), the fake score unguided (kappa2 = 1).
"""

from __future__ import annotations

import torch

from bigsid.objectives.base import Objective, per_sample_sum, upcast


class DMD(Objective):
    def generator_loss(self, teacher, fake_score, x_gen, cond, t=None, eps=None):
        with torch.no_grad():
            t, eps, x_t = self.noise(x_gen.detach(), t, eps)
            f_phi, f_psi = self.scores(teacher, fake_score, x_t, t, cond)
            w = self.sid_weight(upcast(x_gen.detach()), f_phi)
            grad = (f_psi - f_phi) * w.view((-1,) + (1,) * (x_gen.ndim - 1))
            target = upcast(x_gen.detach()) - grad
        loss = 0.5 * per_sample_sum((upcast(x_gen) - target).square())
        return loss, {"generator/loss": loss.detach(), "generator/weight": w,
                      "generator/delta_rms": (f_phi - f_psi).square().flatten(1).mean(1).sqrt()}
