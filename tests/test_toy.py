"""The analytic ground truth itself: the GMM's exact denoiser and the metrics that score against it."""

import math

import pytest
import torch

from bigsid.config import GMMConfig
from bigsid.diffusion import SD_SCHEDULER_CONFIG, VPSchedule
from bigsid.toy import GMM, frechet_distance, mode_scores

SCHEDULE = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)
TRUTH = GMM.from_config(GMMConfig(num_prompts=2, modes_per_prompt=3, latent_shape=[4, 2, 2], mode_std=0.1, seed=0))


def log_density(truth: GMM, x_t, a, s, index):
    """log p_t(x_t) of the noised mixture: sum_m w_m N(x_t; a mu_m, (a^2 std^2 + s^2) I)."""
    mu = truth.means.flatten(0, 1).double()
    v = a.square() * truth.std ** 2 + s.square()
    sq = (x_t[:, None, :] - a[:, :, None] * mu[None]).square().sum(-1)
    return torch.logsumexp(truth.log_prior(index).double() - sq / (2 * v) - truth.dim / 2 * torch.log(2 * math.pi * v),
                           dim=1)


@pytest.mark.parametrize("t_value", [20, 400, 979])
def test_posterior_mean_is_tweedie_on_the_mixture_density(t_value):
    """E[x0 | x_t] = (x_t + s^2 grad log p_t(x_t)) / a, for every prompt and the empty-prompt mixture."""
    gen = torch.Generator().manual_seed(0)
    index = torch.arange(3).repeat_interleave(50)  # prompts 0, 1 and the all-prompt mixture
    x0, _ = TRUTH.sample(index, gen)
    t = torch.full((len(index),), t_value)
    x_t = SCHEDULE.add_noise(x0.flatten(1), torch.randn(len(index), TRUTH.dim, generator=gen), t).double()
    a, s = (c.double() for c in SCHEDULE.coeffs(t, 2))
    x_t.requires_grad_(True)
    (score,) = torch.autograd.grad(log_density(TRUTH, x_t, a, s, index).sum(), x_t)
    torch.testing.assert_close(TRUTH.posterior_mean(x_t.detach(), a, s, index), (x_t.detach() + s.square() * score) / a)


def test_exact_samples_score_as_exact():
    gen = torch.Generator().manual_seed(1)
    x, modes = TRUTH.sample(torch.zeros(20_000, dtype=torch.long), gen)
    y, _ = TRUTH.sample(torch.zeros(20_000, dtype=torch.long), gen)
    assert modes.max() < 3  # prompt 0 draws only its own components
    assert frechet_distance(x, y) < 0.01
    tv, off = mode_scores(x, TRUTH, 0)
    assert tv < 0.01
    assert off == pytest.approx(0.001, abs=0.001)  # the radius holds 99.9%


def test_metrics_see_lost_modes_and_bridges():
    gen = torch.Generator().manual_seed(2)
    x, modes = TRUTH.sample(torch.zeros(6000, dtype=torch.long), gen)
    one_mode = x[modes == 0]
    assert mode_scores(one_mode, TRUTH, 0)[0] == pytest.approx(2 / 3)
    # half the samples moved to midpoints between two modes: mode frequencies can stay right, bridges cannot hide
    mu = TRUTH.means[0]
    bridged = x.flatten(1).clone()
    bridged[::2] = 0.5 * (mu[modes[::2]] + mu[(modes[::2] + 1) % 3])
    assert mode_scores(bridged, TRUTH, 0)[1] == pytest.approx(0.5, abs=0.01)
    assert frechet_distance(bridged, x) > 0.1
