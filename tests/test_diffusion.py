import pytest
import torch
from diffusers import DDPMScheduler

from bigsid.diffusion import SD_SCHEDULER_CONFIG, ScheduleError, VPSchedule
from bigsid.models import Cond, predict

SCHEDULE = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)


def test_schedule_matches_diffusers_and_is_variance_preserving():
    ref = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod
    torch.testing.assert_close(SCHEDULE.a.double().square(), ref.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(SCHEDULE.a.square() + SCHEDULE.s.square(), torch.ones(1000))
    # SiD-LSG: the generator input at t = 625 is sqrt(1 - abar) z = 0.9286 z (VE sigma 2.50)
    assert SCHEDULE.s[625].item() == pytest.approx(0.9286, abs=1e-4)
    assert (SCHEDULE.s[625] / SCHEDULE.a[625]).item() == pytest.approx(2.50, abs=0.01)


@pytest.mark.parametrize("src", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("dst", ["epsilon", "v_prediction", "sample"])
def test_conversions_invert(src, dst):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 4, 3, 3, generator=gen), torch.randn(64, 4, 3, 3, generator=gen)
    t = torch.randint(0, 1000, (64,), generator=gen)
    x_t = SCHEDULE.add_noise(x0, eps, t)
    a, s = SCHEDULE.coeffs(t, 4)
    truth = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
    torch.testing.assert_close(SCHEDULE.convert(truth[src], x_t, t, src, dst), truth[dst], rtol=1e-4, atol=2e-4)


def test_unsupported_schedulers_are_refused_with_the_reason():
    with pytest.raises(ScheduleError, match="FlowMatchEulerDiscreteScheduler is not supported"):
        VPSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ScheduleError, match="prediction_type"):
        VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG, "flow")
    clipped = VPSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "clip_sample": True})
    torch.testing.assert_close(clipped.a, SCHEDULE.a)  # clip_sample never reaches the maths


def test_sample_t_covers_its_range_uniformly():
    t = SCHEDULE.sample_t(100_000, 20, 979, "cpu", torch.Generator().manual_seed(0))
    assert t.min() == 20 and t.max() == 979
    assert abs(t.float().mean().item() - 499.5) < 3


class Linear(torch.nn.Module):
    prediction_type = "v_prediction"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x_t, t, emb):
        self.calls += 1
        return 0.5 * x_t + emb.view(-1, 1, 1, 1)


def test_guidance_is_cfg_in_eps_space_in_one_batched_call():
    net = Linear()
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(8, 4, 2, 2, generator=gen), torch.randint(20, 980, (8,), generator=gen)
    cond = Cond(torch.randn(8, 1, generator=gen), torch.full((1, 1), -0.3))
    guided = predict(net, SCHEDULE, x_t, t, cond, guidance=4.5)
    assert net.calls == 1
    eps_c = predict(net, SCHEDULE, x_t, t, cond, out="epsilon")
    eps_u = predict(net, SCHEDULE, x_t, t, Cond(cond.uncond.expand(8, 1), cond.uncond), out="epsilon")
    expected = SCHEDULE.convert(eps_u + 4.5 * (eps_c - eps_u), x_t, t, "epsilon", "sample")
    torch.testing.assert_close(guided, expected)


def test_prompt_drop_uses_the_empty_prompt_embedding():
    cond = Cond(torch.ones(4, 3, 2), torch.zeros(1, 3, 2))
    dropped = cond.drop(torch.tensor([True, False, False, True]))
    assert dropped.emb.flatten(1).sum(1).tolist() == [0, 6, 6, 0]
