import pytest
import torch
from diffusers import DDPMScheduler

from bigsid.diffusion import SD_SCHEDULER_CONFIG, FlowSchedule, Schedule, ScheduleError, VPSchedule
from bigsid.models import predict
from bigsid.text import Cond

SCHEDULE = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)


def test_schedule_matches_diffusers_and_is_variance_preserving():
    ref = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod
    torch.testing.assert_close(SCHEDULE.a.double().square(), ref.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(SCHEDULE.a.square() + SCHEDULE.s.square(), torch.ones(1000))
    # SiD-LSG: the generator input at t = 625 is sqrt(1 - abar) z = 0.9286 z (VE sigma 2.50)
    assert SCHEDULE.s[625].item() == pytest.approx(0.9286, abs=1e-4)
    assert (SCHEDULE.s[625] / SCHEDULE.a[625]).item() == pytest.approx(2.50, abs=0.01)


FLOW = FlowSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_flow_schedule_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # diffusers builds its sigmas in float32 from float32 grid points (a few roundings of 2^-24 each); 1e-6 relative
    torch.testing.assert_close(FLOW.s.flip(0), ref.sigmas.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(FLOW.timestep(torch.arange(1000)).flip(0), ref.timesteps.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(FLOW.a + FLOW.s, torch.ones(1000))
    assert FLOW.s[999] == 1 and FLOW.a[999] == 0  # t = N - 1 is pure noise: x_t = eps


CASES = [(SCHEDULE, src, dst) for src in ("epsilon", "v_prediction", "sample")
         for dst in ("epsilon", "v_prediction", "sample", "flow")]
CASES += [(FLOW, src, dst) for src in ("flow", "sample") for dst in ("epsilon", "v_prediction", "sample", "flow")]


@pytest.mark.parametrize("schedule,src,dst", CASES, ids=[f"{s.kind}-{a}-{b}" for s, a, b in CASES])
def test_conversions_invert(schedule, src, dst):
    gen = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(256, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    t = torch.cat([torch.tensor([0, schedule.num_timesteps - 1]), torch.randint(0, 1000, (254,), generator=gen)])
    a, s = (c.double() for c in schedule.coeffs(t, 4))
    x_t = a * x0 + s * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0, "flow": eps - x0}
    # float64: each side is a handful (< 12) of operations on values of size at most M = (|x0| + |eps|) / min(a, s)
    # over the tested times (the conversions divide by a only from eps, by s to eps), each rounding within 2^-53 of
    # its result; 24 roundings of M bound the difference.
    floor = torch.minimum(a, s) if src == "epsilon" or dst in ("epsilon", "v_prediction", "flow") else torch.ones_like(a)
    bound = 24 * 2.0 ** -53 * (x0.abs() + eps.abs()) / floor
    err = (schedule.convert(truth[src], x_t, t, src, dst) - truth[dst]).abs()
    assert (err <= bound).all(), f"off by {(err / bound).max():.3g} bounds"


def test_unsupported_schedulers_are_refused_with_the_reason():
    with pytest.raises(ScheduleError, match="ScoreSdeVeScheduler is not supported"):
        Schedule.from_scheduler_config({"_class_name": "ScoreSdeVeScheduler"})
    with pytest.raises(ScheduleError, match="rectified-flow schedule, not VP"):
        VPSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ScheduleError, match="dynamic shifting"):  # FLUX's resolution-dependent shift
        Schedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(ScheduleError, match="prediction_type"):
        VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG, "flow")
    with pytest.raises(ScheduleError, match="prediction_type"):
        FLOW.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "epsilon")
    clipped = VPSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "clip_sample": True})
    torch.testing.assert_close(clipped.a, SCHEDULE.a)  # clip_sample never reaches the maths


def test_vp_keys_bigsid_cannot_reproduce_are_named_and_sampler_spacing_is_accepted():
    for key, value, says in (("timestep_type", "continuous", "timestep_type='continuous'.*'discrete'"),
                             ("beta_schedule", "sigmoid", "beta_schedule='sigmoid'.*linear.*trained_betas"),
                             ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr=true.*remove the key")):
        with pytest.raises(ScheduleError, match=says):
            Schedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, key: value})
    # Karras spacing picks a sampler's steps over the same betas: the training schedule is untouched, bit for bit.
    karras = Schedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler",
                                             "use_karras_sigmas": True})
    assert torch.equal(karras.a, SCHEDULE.a) and torch.equal(karras.s, SCHEDULE.s)
    # given betas are the schedule, whatever beta_schedule says
    betas = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).betas.tolist()
    given = Schedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "beta_schedule": "sigmoid",
                                            "trained_betas": betas})
    assert torch.equal(given.a, SCHEDULE.a) and torch.equal(given.s, SCHEDULE.s)


def test_sample_t_covers_its_range_uniformly():
    t = SCHEDULE.sample_t(100_000, 20, 979, "cpu", torch.Generator().manual_seed(0))
    assert t.min() == 20 and t.max() == 979
    assert abs(t.float().mean().item() - 499.5) < 3
    # power 1 is the uniform draw itself, bit for bit: the papers' setting is untouched
    assert torch.equal(t, SCHEDULE.sample_t(100_000, 20, 979, "cpu", torch.Generator().manual_seed(0), power=1.0))


@pytest.mark.parametrize("power", [0.5, 4.0])
def test_sample_t_with_a_power_has_the_density_it_states(power):
    # t = round(t_min + R u^(1/p)), R = t_max - t_min, so P(t <= k) = ((k + 1/2 - t_min) / R)^p exactly at every
    # grid point k: the only error is sampling's, whose sup over any set of points is within the Kolmogorov-Smirnov
    # 99.9% quantile 1.95 / sqrt(n) (a fixed seed: the draw either meets it or the code is wrong).
    t_min, t_max, n = 20, 979, 100_000
    t = SCHEDULE.sample_t(n, t_min, t_max, "cpu", torch.Generator().manual_seed(1), power=power)
    assert t.min() >= t_min and t.max() <= t_max
    k = torch.arange(t_min, t_max, dtype=torch.float64)
    empirical = torch.bincount(t - t_min, minlength=t_max - t_min + 1).cumsum(0)[:-1].double() / n
    exact = ((k + 0.5 - t_min) / (t_max - t_min)).clamp(max=1).pow(power)
    assert (empirical - exact).abs().max() < 1.95 / n ** 0.5, (empirical - exact).abs().max()
    # and not the uniform: the test fails on the draw it replaces
    uniform = ((k - t_min + 1) / (t_max - t_min + 1))
    assert (empirical - uniform).abs().max() > 0.1


class Linear(torch.nn.Module):
    prediction_type = "v_prediction"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x_t, t, cond):
        self.calls += 1
        return 0.5 * x_t + cond.emb.view(-1, 1, 1, 1)


def test_guidance_is_cfg_in_eps_space_in_one_batched_call():
    net = Linear()
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(8, 4, 2, 2, generator=gen), torch.randint(20, 980, (8,), generator=gen)
    cond = Cond(torch.randn(8, 1, generator=gen), uncond=Cond(torch.full((1, 1), -0.3)))
    guided = predict(net, SCHEDULE, x_t, t, cond, guidance=4.5)
    assert net.calls == 1
    eps_c = predict(net, SCHEDULE, x_t, t, cond, out="epsilon")
    eps_u = predict(net, SCHEDULE, x_t, t, Cond(cond.uncond.emb.expand(8, 1), uncond=cond.uncond), out="epsilon")
    expected = SCHEDULE.convert(eps_u + 4.5 * (eps_c - eps_u), x_t, t, "epsilon", "sample")
    torch.testing.assert_close(guided, expected)


def test_prompt_drop_uses_the_empty_prompt_embedding():
    cond = Cond(torch.ones(4, 3, 2), uncond=Cond(torch.zeros(1, 3, 2)))
    dropped = cond.drop(torch.tensor([True, False, False, True]))
    assert dropped.emb.flatten(1).sum(1).tolist() == [0, 6, 6, 0]
