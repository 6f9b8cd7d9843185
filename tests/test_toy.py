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
    scores = mode_scores(x, TRUTH, 0)
    assert scores["mode_coverage_tv"] < 0.01
    assert scores["off_mode_fraction"] == pytest.approx(0.001, abs=0.001)  # the radius holds 99.9%
    # ||x - mu|| / std ~ chi_D (sd ~0.7 at D = 16, median ~3.9): the median of 20,000 has relative sd about
    # 1.25 * 0.7 / (sqrt(20,000) * 3.9) = 1.6e-3; 0.01 is 6 of those
    assert scores["spread_ratio"] == pytest.approx(1.0, abs=0.01)


def test_moments_are_the_mixtures_closed_form():
    """Two modes at +-m with weights w, 1 - w: mean (2w - 1) m, covariance std^2 I + 4 w (1 - w) m m^T, which
    GMM.moments reaches by another sum; float64 throughout, so equal to rounding (entries O(1), 1e-12)."""
    m = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    w = 0.3
    truth = GMM(torch.stack([m, -m])[None], torch.tensor([[w, 1 - w]], dtype=torch.float64), 0.2, [4, 1, 1], ["p"])
    mu, cov = truth.moments(0)
    torch.testing.assert_close(torch.from_numpy(mu), (2 * w - 1) * m, rtol=0, atol=1e-12)
    expected = 0.2 ** 2 * torch.eye(4, dtype=torch.float64) + 4 * w * (1 - w) * torch.outer(m, m)
    torch.testing.assert_close(torch.from_numpy(cov), expected, rtol=0, atol=1e-12)


def test_metrics_see_lost_modes_and_bridges():
    gen = torch.Generator().manual_seed(2)
    x, modes = TRUTH.sample(torch.zeros(6000, dtype=torch.long), gen)
    one_mode = x[modes == 0]
    assert mode_scores(one_mode, TRUTH, 0)["mode_coverage_tv"] == pytest.approx(2 / 3)
    # half the samples moved to midpoints between two modes: mode frequencies can stay right, bridges cannot hide
    mu = TRUTH.means[0]
    bridged = x.flatten(1).clone()
    bridged[::2] = 0.5 * (mu[modes[::2]] + mu[(modes[::2] + 1) % 3])
    assert mode_scores(bridged, TRUTH, 0)["off_mode_fraction"] == pytest.approx(0.5, abs=0.01)
    assert frechet_distance(bridged, x) > 0.1


def test_modes_too_wide_are_told_from_bridges_by_the_spread():
    """Every sample at twice its true distance from its mode: most fall outside the 99.9% radius, as bridges
    would, but the spread says why (2, exactly: each distance doubles, and the nearest mode stays the same at this separation)."""
    gen = torch.Generator().manual_seed(3)
    x, modes = TRUTH.sample(torch.zeros(6000, dtype=torch.long), gen)
    x, mu = x.flatten(1).double(), TRUTH.means[0][modes].double()
    wide = mu + 2 * (x - mu)  # float64: the doubling is exact, cdist's rounding ~1e-16 |x|^2 / d^2 ~ 1e-14
    assert (TRUTH.nearest_mode(wide, 0)[1] == modes).all()
    exact, scores = mode_scores(x, TRUTH, 0), mode_scores(wide, TRUTH, 0)
    assert scores["spread_ratio"] == pytest.approx(2 * exact["spread_ratio"], rel=1e-12)
    assert scores["mode_weights"] == exact["mode_weights"] and scores["mode_coverage_tv"] < 0.03
    # outside the radius r: 4 ||x - mu||^2 / std^2 > r^2 / std^2, with ||x - mu||^2 / std^2 ~ chi2_D; binomial sd
    # over 6,000 samples <= 0.0065, so 0.02 is 3 of them
    import scipy.stats

    expected = scipy.stats.chi2.sf(scipy.stats.chi2.ppf(0.999, TRUTH.dim) / 4, TRUTH.dim)
    assert scores["off_mode_fraction"] == pytest.approx(expected, abs=0.02) and expected > 0.8


def test_mode_weights_are_the_nearest_mode_shares_and_tv_is_measured_against_the_given_weights():
    mu = TRUTH.means[0]
    x = torch.cat([mu[0].expand(5, -1), mu[1].expand(3, -1), mu[2].expand(2, -1)])
    scores = mode_scores(x, TRUTH, 0, weights=torch.tensor([0.5, 0.5, 0.0]))
    assert scores["mode_weights"] == [0.5, 0.3, 0.2]
    assert scores["mode_coverage_tv"] == pytest.approx(0.5 * (0.0 + 0.2 + 0.2))
    assert scores["spread_ratio"] == 0.0 and scores["off_mode_fraction"] == 0.0


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_guided_exact_denoiser_is_its_closed_form(guidance):
    """Classifier-free guidance of the exact denoiser, done in eps space by `predict`, is in x0 terms
    (1 - w) E[x0 | x_t] + w E[x0 | x_t, c] (eps is affine in x0 at fixed x_t), with the empty prompt's expectation
    over the all-prompt mixture. float64 throughout: only rounding separates the two."""
    from bigsid.models import predict
    from bigsid.toy import GMMDenoiser, VocabEncoder

    gen = torch.Generator().manual_seed(4)
    index = torch.tensor([0, 1] * 8)
    t = torch.tensor([20, 300, 600, 979] * 4)
    x0, _ = TRUTH.sample(index, gen)
    x_t = SCHEDULE.add_noise(x0, torch.randn(x0.shape, generator=gen), t).double()
    encoder = VocabEncoder(TRUTH.prompts).double()
    guided = predict(GMMDenoiser(TRUTH, SCHEDULE).double(), SCHEDULE, x_t, t, encoder([TRUTH.prompts[i] for i in index]),
                     guidance, out="sample")
    a, s = (c.double() for c in SCHEDULE.coeffs(t, 2))
    flat = x_t.flatten(1)
    cond = TRUTH.posterior_mean(flat, a, s, index)
    uncond = TRUTH.posterior_mean(flat, a, s, torch.full_like(index, len(TRUTH.prompts)))
    torch.testing.assert_close(guided.flatten(1).double(), (1 - guidance) * uncond + guidance * cond,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("teacher, fit_ok", [("teacher.student_fit_steps=1", False),
                                             ("teacher.gmm_teacher=exact", True)])
def test_a_teacher_far_worse_than_the_exact_denoiser_is_warned_about(tmp_path, caplog, teacher, fit_ok):
    """An MLP teacher fitted for one step (its random weights, nearly) is warned about; the exact denoiser as
    teacher is its own reference (same sampler, same noise), so it passes whatever the sampler's own error."""
    from test_trainer import make

    metrics = make(tmp_path, teacher).evaluate()
    assert metrics["teacher_fit_ok"] is fit_ok
    assert ("poor fit" in caplog.text) is not fit_ok
    if fit_ok:
        assert metrics["fd_teacher_sampler"] == metrics["fd_exact_sampler"]


@pytest.mark.parametrize("latent_shape, width, steps", [("[4,2,2]", 512, 1500), ("[4,8,8]", 1024, 6000)])
def test_the_fitted_teacher_is_sized_by_the_latent_size_unless_set(monkeypatch, latent_shape, width, steps):
    """0 (the default) sizes the MLP teacher by the latent size D: max(512, 4 D) wide, 1500 sqrt(D / 16) fit
    steps; a set width or step count is kept."""
    import bigsid.toy
    from bigsid.config import load_config
    from bigsid.models import build_networks

    fits = []
    monkeypatch.setattr(bigsid.toy, "fit_denoiser", lambda net, *a, steps, **k: fits.append((net, steps)) or 0.0)
    gmm = f"teacher.gmm.latent_shape={latent_shape}"
    for overrides, expected in (([], (width, steps)), (["teacher.student_width=96", "teacher.student_fit_steps=7"],
                                                       (96, 7))):
        build_networks(load_config(None, ["teacher.kind=toy_gmm", gmm, *overrides]))
        net, fit_steps = fits.pop()
        assert (net.body[0].out_features, fit_steps) == expected


def test_a_guided_run_is_measured_against_the_exact_guided_sampler(tmp_path):
    from test_trainer import make

    metrics = make(tmp_path, "objective.kappa4=2", "eval.reference_steps=20").evaluate()
    assert metrics["guidance"] == 2.0
    # the guided truth differs from the unguided mixture: its reference mode weights are measured, not 1/K
    weights = torch.tensor(metrics["reference_mode_weights"])
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights), dtype=weights.dtype))
    assert not torch.equal(weights, torch.full_like(weights, 1 / weights.shape[1]))


def test_the_teacher_sampler_reads_its_eps_the_same_for_a_v_prediction_teacher():
    """sample_teacher feeds DDIM the eps-prediction; a v-prediction scheduler config must not make DDIM read it as
    v. The exact denoiser on either config is the same function, so the samples agree to float32 rounding of the
    conversions (|x| ~ 3, u ~ 6e-8, 5 steps of a few operations each: well under 1e-4)."""
    from bigsid.toy import GMMDenoiser, VocabEncoder, sample_teacher

    samples = []
    for prediction_type in ("epsilon", "v_prediction"):
        config = {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type}
        schedule = VPSchedule.from_scheduler_config(config)
        samples.append(sample_teacher(GMMDenoiser(TRUTH, schedule), schedule, config, VocabEncoder(TRUTH.prompts),
                                      TRUTH.prompts[0], 64, TRUTH.latent_shape, steps=5, seed=0))
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=1e-4)


def test_the_summary_says_whether_the_teacher_was_reached_beside_the_noise_floor():
    from bigsid.toy import TV_SLACK, reaches_teacher, summary

    metrics = {"teacher_sampler_steps": 25, "fd_generator": 0.25, "fd_teacher_sampler": 0.30, "fd_exact_sampler": 0.29,
               "fd_reference": 0.036, "mode_coverage_tv": 0.03, "mode_coverage_tv_teacher_sampler": 0.025,
               "mode_coverage_tv_exact_sampler": 0.02, "mode_coverage_tv_reference": 0.01}
    assert reaches_teacher(metrics)
    text = summary(metrics)
    assert "target REACHED" in text and "noise floor 0.0360" in text
    # the teacher's values sit beside the generator's in each row
    assert "0.2500" in text.splitlines()[1] and "0.3000" in text.splitlines()[1]
    for worse in ({"fd_generator": 0.31}, {"mode_coverage_tv": 0.025 + TV_SLACK + 1e-3}):
        assert not reaches_teacher(metrics | worse)
        assert "target NOT reached" in summary(metrics | worse)


def test_held_since_is_the_last_unbroken_stretch_of_evaluations_meeting_the_target(tmp_path):
    """A target met, lost and met again is held only since it was met again; a last evaluation that misses holds
    nothing. Rows logged with other metrics in between, and a torn last line, are skipped."""
    import json

    from bigsid.toy import held_since

    def row(step, fd, tv=0.02):
        return {"step": step, "nimg": 256 * step, "eval/fd_generator": fd, "eval/fd_teacher_sampler": 0.3,
                "eval/mode_coverage_tv": tv, "eval/mode_coverage_tv_teacher_sampler": 0.02}

    rows = [row(0, 6.0), row(100, 0.29), {"step": 150, "nimg": 38400, "loss/generator": 1.0}, row(200, 0.31),
            row(300, 0.3), row(400, 0.2, tv=0.025)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5')
    assert held_since(tmp_path) == (300, 2)
    log.write_text("".join(json.dumps(r) + "\n" for r in [*rows, row(500, 0.2, tv=0.031)]))
    assert held_since(tmp_path) is None  # TV 0.031 > 0.02 + 0.01
    assert held_since(tmp_path / "no_run") is None


def test_centre_offset_is_the_inside_samples_mean_distance_from_the_true_mean():
    """Mode 0: pairs mu_0 +- s e_j, whose mean is mu_0 exactly; mode 1: the same pairs around mu_1 + d with |d| =
    2 std. One sample at the midpoint of modes 0 and 2, outside every radius, would move its nearest mode's mean by
    far more if it counted. Offsets 0 and 2: their mean over the two modes present is 1 (float64, O(1) values: 1e-12)."""
    mu, std = TRUTH.means[0].double(), TRUTH.std
    pairs = torch.cat([torch.eye(TRUTH.dim, dtype=torch.float64)[:4], -torch.eye(TRUTH.dim, dtype=torch.float64)[:4]])
    shift = 2 * std * torch.eye(TRUTH.dim, dtype=torch.float64)[5]
    bridge = 0.5 * (mu[0] + mu[2])
    x = torch.cat([mu[0] + std * pairs, mu[1] + shift + std * pairs, bridge[None]])
    scores = mode_scores(x, TRUTH, 0)
    assert scores["off_mode_fraction"] == pytest.approx(1 / 17)  # the bridge alone is outside
    assert scores["centre_offset"] == pytest.approx(1.0, abs=1e-12)


def test_spread_and_off_mode_share_match_hand_computed_distances():
    """Samples at chosen distances from mode 1 along one axis: the nearest mode is mode 1 (every distance is under
    half the gap to the other modes), the spread ratio is the median distance over std sqrt(chi2_16 median) and the
    off-mode share counts the distances beyond std sqrt(chi2_16 99.9% quantile) = 0.63."""
    import scipy.stats

    mu = TRUTH.means[0].double()
    distance = torch.tensor([0.2, 0.4, 0.5, 0.8, 1.0], dtype=torch.float64)
    assert distance.max() < 0.5 * torch.cdist(mu[1:2], mu[[0, 2]]).min()
    x = mu[1] + distance[:, None] * torch.eye(TRUTH.dim, dtype=torch.float64)[0]
    scores = mode_scores(x, TRUTH, 0)
    assert scores["mode_weights"] == [0.0, 1.0, 0.0]
    assert scores["mode_coverage_tv"] == pytest.approx(2 / 3)
    # float64 distances of O(1) from cdist: rounding ~1e-15, far inside rel 1e-9
    assert scores["spread_ratio"] == pytest.approx(0.5 / (0.1 * math.sqrt(scipy.stats.chi2.ppf(0.5, 16))), rel=1e-9)
    assert scores["off_mode_fraction"] == pytest.approx(2 / 5)
