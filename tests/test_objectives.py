"""The losses against closed-form ground truth: Gaussian data, Gaussian generator, exact denoisers.

Data p = N(0, I); generator x_gen = mu + sigma * z, so q_t = N(a mu, (a^2 sigma^2 + s^2) I) and both the teacher
and the (exact) fake score are closed-form x0-predictions. This is the SiD paper's one-dimensional example,
in a few dimensions.
"""


import pytest
import torch
from torch import nn

from bigsid.config import ObjectiveConfig
from bigsid.diffusion import SD_SCHEDULER_CONFIG, VPSchedule
from bigsid.text import Cond
from bigsid.objectives import DMD, SIM, SiD

SCHEDULE = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)
DIM = 3


class GaussianDenoiser(nn.Module):
    """Exact E[x0 | x_t] for x0 ~ N(mu, sigma^2 I): mu + a sigma^2 / (a^2 sigma^2 + s^2) (x_t - a mu)."""

    prediction_type = "sample"

    def __init__(self, mu, sigma):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, x_t, t, cond):
        a, s = SCHEDULE.coeffs(t, x_t.ndim)
        v = a ** 2 * self.sigma ** 2 + s ** 2
        return self.mu + a * self.sigma ** 2 / v * (x_t - a * self.mu)


def cond(n):
    return Cond(torch.zeros(n, 1), uncond=Cond(torch.zeros(1, 1)))


def setup(mu0, sigma0, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(sigma0, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    teacher = GaussianDenoiser(torch.zeros(DIM, dtype=torch.float64), 1.0)
    fake = GaussianDenoiser(mu.detach().clone(), sigma.detach().clone())  # exact fake score, frozen
    return mu, sigma, z, eps, teacher, fake, gen


def objective(cls, **kw):
    return cls(ObjectiveConfig(**kw), SCHEDULE)


def generator_grad(obj, mu0, sigma0=1.0, n=200_000, t_value=None, seed=0):
    mu, sigma, z, eps, teacher, fake, gen = setup(mu0, sigma0, n, seed)
    t = torch.full((n,), t_value) if t_value is not None else torch.randint(20, 980, (n,), generator=gen)
    x_gen = mu + sigma * z
    loss, _ = obj.generator_loss(teacher, fake, x_gen, cond(n), t=t, eps=eps)
    loss.mean().backward()
    return mu.grad, sigma.grad


@pytest.mark.parametrize("cls,kw", [(SiD, {"alpha": 1.0}), (SiD, {"alpha": 1.2}), (SIM, {}),
                                    (SIM, {"sim_distance": "l2"}), (DMD, {})])
def test_gradient_vanishes_at_the_fixed_point_and_points_home_away_from_it(cls, kw):
    obj = objective(cls, **kw)
    g_mu, _ = generator_grad(obj, [0.0] * DIM)
    g_away, _ = generator_grad(obj, [0.5, -1.0, 2.0])
    scale = g_away.norm()
    # At p_theta = p_data the expected gradient is zero: what is left is Monte Carlo noise.
    assert g_mu.norm() < 0.05 * scale
    # Away from it, gradient descent moves mu towards 0 in every coordinate.
    assert torch.all(g_away * torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) > 0)


def test_sigma_gradient_shrinks_a_too_wide_generator():
    for cls in (SiD, SIM, DMD):
        _, g_sigma = generator_grad(objective(cls), [0.0] * DIM, sigma0=1.5)
        assert g_sigma > 0, cls.__name__


def sample_losses(obj, mu0, sigma0, n=512, t_value=None):
    mu, sigma, z, eps, teacher, fake, gen = setup(mu0, sigma0, n)
    t = torch.full((n,), t_value) if t_value is not None else torch.randint(20, 980, (n,), generator=gen)
    x_gen = mu + sigma * z
    loss, _ = obj.generator_loss(teacher, fake, x_gen, cond(n), t=t, eps=eps)
    return loss, mu, sigma, t


def test_sim_l2_is_sid_alpha_one_up_to_the_documented_weight():
    mu0, sigma0 = [0.3, -0.7, 1.1], 1.3
    sid, mu_sid, _, t = sample_losses(objective(SiD, alpha=1.0), mu0, sigma0)
    sim, mu_sim, _, _ = sample_losses(objective(SIM, sim_distance="l2", sim_weighting="adaptive"), mu0, sigma0)
    torch.testing.assert_close(sim, sid, rtol=1e-6, atol=1e-9)  # k = a / s^2 comes from the fp32 schedule
    (g_sid,) = torch.autograd.grad(sid.sum(), mu_sid)
    (g_sim,) = torch.autograd.grad(sim.sum(), mu_sim)
    torch.testing.assert_close(g_sim, g_sid, rtol=1e-6, atol=1e-9)  # k = a / s^2 comes from the fp32 schedule
    # The paper's uniform-weight SIM-L2 differs only by the per-sample factor 2 k^2 / w_sid.
    raw, _, _, _ = sample_losses(objective(SIM, sim_distance="l2", sim_weighting="uniform"), mu0, sigma0)
    a, s = SCHEDULE.coeffs(t, 1)
    k = (a / s ** 2).double()
    mu, sigma, z, eps, teacher, fake, _ = setup(mu0, sigma0, 512)
    x_t = SCHEDULE.add_noise(mu + sigma * z, eps, t)
    w = 1 / ((mu + sigma * z) - teacher(x_t, t, None)).abs().mean(1)
    torch.testing.assert_close(raw, sid * 2 * k ** 2 / w.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_sim_surrogate_gradient_equals_the_true_divergence_gradient(distance):
    """grad_theta E_{x ~ q_t (sampling frozen)} d(s_q(x) - s_p(x)) in closed-form scores vs SIM's surrogate."""
    t_value, c, n = 500, 0.7, 400_000
    mu0, sigma0 = [0.4, -0.2, 0.9], 1.4
    obj = objective(SIM, sim_distance=distance, sim_c=c, sim_c_units="score", sim_weighting="uniform")
    g_mu, g_sigma = generator_grad(obj, mu0, sigma0, n=n, t_value=t_value, seed=1)

    a, s = (float(v) for v in SCHEDULE.coeffs(torch.tensor([t_value]), 1))
    gen = torch.Generator().manual_seed(2)
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(sigma0, dtype=torch.float64, requires_grad=True)
    x = a * (torch.tensor(mu0, dtype=torch.float64) + sigma0 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)) \
        + s * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    score_q = -(x - a * mu) / (a ** 2 * sigma ** 2 + s ** 2)
    score_p = -x / (a ** 2 + s ** 2)
    y2 = (score_q - score_p).square().sum(1)
    d = y2 if distance == "l2" else torch.sqrt(y2 + c ** 2) - c
    true_mu, true_sigma = torch.autograd.grad(d.mean(), (mu, sigma))
    torch.testing.assert_close(g_mu, true_mu, rtol=0.03, atol=0.03 * true_mu.norm().item())
    torch.testing.assert_close(g_sigma, true_sigma, rtol=0.03, atol=0.03 * true_sigma.abs().item())


def test_pseudo_huber_in_x0_units_tends_to_sid_as_c_grows():
    mu0, sigma0 = [0.3, -0.7, 1.1], 1.3
    sid, _, _, _ = sample_losses(objective(SiD, alpha=1.0), mu0, sigma0)
    sim, _, _, _ = sample_losses(objective(SIM, sim_c=1e4), mu0, sigma0)
    torch.testing.assert_close(sim, sid, rtol=1e-6, atol=1e-9)
    damped, _, _, _ = sample_losses(objective(SIM, sim_c=0.05), mu0, sigma0)
    assert torch.all(damped.abs() <= sid.abs() + 1e-12)


def test_dmd_gradient_is_its_closed_form_and_skips_the_networks():
    n = 64
    mu, sigma, z, eps, teacher, fake, gen = setup([0.5, 0.0, -0.5], 1.0, n)
    t = torch.randint(20, 980, (n,), generator=gen)
    x_gen = (mu + sigma * z).detach().requires_grad_(True)
    loss, _ = objective(DMD).generator_loss(teacher, fake, x_gen, cond(n), t=t, eps=eps)
    loss.sum().backward()
    x_t = SCHEDULE.add_noise(x_gen.detach(), eps, t)
    f_phi, f_psi = teacher(x_t, t, None), fake(x_t, t, None)
    w = 1 / (x_gen.detach() - f_phi).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x_gen.grad, (f_psi - f_phi) * w, rtol=1e-6, atol=1e-9)


def test_sid_loss_matches_the_paper_formula_elementwise():
    n, alpha = 16, 1.2
    mu, sigma, z, eps, teacher, fake, gen = setup([0.2, 0.1, -0.3], 1.1, n)
    t = torch.randint(20, 980, (n,), generator=gen)
    x_gen = mu + sigma * z
    loss, _ = objective(SiD, alpha=alpha).generator_loss(teacher, fake, x_gen, cond(n), t=t, eps=eps)
    x_t = SCHEDULE.add_noise(x_gen, eps, t)
    f_phi, f_psi = teacher(x_t, t, None), fake(x_t, t, None)
    w = 1 / (x_gen - f_phi).abs().mean(1).detach()
    expected = w * ((f_phi - f_psi) * ((f_phi - x_gen) - alpha * (f_phi - f_psi))).sum(1)
    torch.testing.assert_close(loss, expected)


def test_fake_score_loss_is_zero_mean_residual_for_the_exact_score():
    """For the exact fake score, E||eps_hat - eps||^2 equals the closed-form posterior variance of eps."""
    n, t_value = 200_000, 300
    mu, sigma, z, eps, teacher, fake, gen = setup([0.0] * DIM, 1.0, n)
    x_gen = (mu + sigma * z).detach()
    obj = objective(SiD)
    loss, _ = obj.fake_score_loss(teacher, x_gen, cond(n), t=torch.full((n,), t_value), eps=eps)
    _, s = (float(v) for v in SCHEDULE.coeffs(torch.tensor([t_value]), 1))
    # data N(0, I): Var(eps | x_t) = 1 - s^2 per dimension
    assert abs(loss.mean().item() - DIM * (1 - s ** 2)) < 0.02 * DIM


def test_edm_fake_score_loss_is_lambda_sigma_times_the_x0_error():
    """SiD's EDM form: lambda(sigma) || f_psi - x_gen ||^2, lambda = (sigma^2 + sd^2) / (sigma sd)^2, sigma = s / a."""
    n, sd = 64, 0.7
    mu, sigma, z, eps, teacher, fake, gen = setup([0.3, -0.2, 0.5], 1.3, n)
    x_gen = (mu + sigma * z).detach()
    t = torch.randint(20, 980, (n,), generator=gen)
    obj = objective(SiD, fake_score_weighting="edm", sigma_data=sd)
    loss, _ = obj.fake_score_loss(teacher, x_gen, cond(n), t=t, eps=eps)
    a, s = SCHEDULE.coeffs(t, 2)
    edm_sigma = s / a
    lam = (edm_sigma ** 2 + sd ** 2) / (edm_sigma * sd) ** 2
    x_t = SCHEDULE.add_noise(x_gen, eps, t)
    expected = (lam * (teacher(x_t, t, None) - x_gen).square()).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)  # the schedule's a_t, s_t are float32
    uniform, _ = objective(SiD).fake_score_loss(teacher, x_gen, cond(n), t=t, eps=eps)
    # large t gains weight over the plain eps loss: (sigma^2 + sd^2) / sd^2 grows with t
    ratio = loss / uniform
    assert torch.all(ratio[t.argsort()].diff() >= -1e-9) and ratio.max() > 100


@pytest.mark.parametrize("name", ["sid", "sim", "dmd"])
def test_guided_scores_use_kappa4_for_the_teacher_and_kappa2_for_the_fake(name):
    calls = []

    class Recorder(GaussianDenoiser):
        def forward(self, x_t, t, cond):
            calls.append((self.tag, x_t.shape[0]))
            return super().forward(x_t, t, cond)

    teacher = Recorder(torch.zeros(DIM), 1.0)
    teacher.tag = "teacher"
    fake = Recorder(torch.ones(DIM), 1.0)
    fake.tag = "fake"
    n = 8
    obj = objective({"sid": SiD, "sim": SIM, "dmd": DMD}[name], kappa2=1.0, kappa4=3.0)
    obj.generator_loss(teacher, fake, torch.randn(n, DIM), cond(n))
    # guided teacher: one batched call on cond + uncond; unguided fake: one call
    assert sorted(calls) == [("fake", n), ("teacher", 2 * n)]


@pytest.mark.parametrize("kappas,drop", [({}, 0.0), ({"kappa4": 1.75}, 0.0), ({"kappa1": 1.5}, 0.1),
                                         ({"kappa2": 1.5}, 0.1), ({"kappa3": 1.5}, 0.1)])
def test_prompts_are_dropped_only_for_a_guided_fake_score(kappas, drop):
    # a guided fake score calls itself on the empty prompt, so it must learn it; a guided teacher knows it already
    assert objective(SiD, prompt_drop=0.1, **kappas).prompt_drop == drop


@pytest.mark.parametrize("name,drop", [("sd15_dmd", 0.0), ("sd15_sid_lsg", 0.1), ("sd15_sim", 0.1)])
def test_shipped_dmd_config_trains_its_fake_score_without_drops(name, drop):
    from pathlib import Path

    from bigsid.config import load_config
    from bigsid.objectives import build_objective

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml", check_data=False)
    assert build_objective(cfg.objective, SCHEDULE).prompt_drop == drop
