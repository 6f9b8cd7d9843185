"""Noise schedules on whole batches: x_t = a_t * x0 + s_t * eps on an integer time grid t in [0, N).

Two families share every formula the objectives use:
- VP (DDPM-family teachers: SD 1.x/2.x, SDXL, PixArt): a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t); the network is
  called at the integer t.
- Rectified flow (SD3-class teachers): x_t = (1 - sigma) x0 + sigma eps, so a_t = 1 - sigma_t, s_t = sigma_t, with
  sigma_t = shift * u / (1 + (shift - 1) * u) at u = (t + 1) / N, the grid and shift of the teacher's
  FlowMatchEulerDiscreteScheduler; the network is called at its training timestep sigma_t * N.
The integer grid keeps one meaning for every time setting: t_min/t_max and the generator's t_init index the
teacher's own training timesteps on both (t = N - 1 is pure noise for a flow teacher, x_t = eps). SiD's weights
are written in x0 terms (w = 1 / mean|x_gen - f_phi|, SIM's k = a_t / s_t^2, EDM's sigma = s_t / a_t), so they
carry over without change. The schedule comes from the teacher's own diffusers scheduler config.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

SUPPORTED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                        "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                        "UniPCMultistepScheduler", "HeunDiscreteScheduler", "LCMScheduler",
                        "FlowMatchEulerDiscreteScheduler")
# flow: the rectified-flow velocity u = dx_t/dsigma = eps - x0 (what diffusers' flow transformers predict)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


class ScheduleError(ValueError):
    """A teacher scheduler this engine cannot reproduce."""


# Stable Diffusion 1.x/2.x training schedule; the toy teacher uses it so toy numbers transfer to SD.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


class Schedule(torch.nn.Module):
    """x_t = a_t x0 + s_t eps at integer t; conversions between the parameterisations, t draws, network times."""

    kind: str
    prediction_types: tuple[str, ...]

    def __init__(self, a: torch.Tensor, s: torch.Tensor, timesteps: torch.Tensor, prediction_type: str):
        super().__init__()
        if prediction_type not in self.prediction_types:
            raise ScheduleError(f"prediction_type {prediction_type!r} does not go with a {self.kind} schedule: "
                                f"one of {self.prediction_types}")
        self.prediction_type = prediction_type
        self.register_buffer("a", a.float(), persistent=False)
        self.register_buffer("s", s.float(), persistent=False)
        self.register_buffer("timesteps", timesteps, persistent=False)

    @classmethod
    def from_scheduler_config(cls, config: dict, prediction_type: str = "") -> "Schedule":
        """The schedule of a teacher's diffusers scheduler config: rectified flow for FlowMatchEulerDiscreteScheduler,
        VP for the DDPM family."""
        name = config.get("_class_name", "DDPMScheduler")
        if name not in SUPPORTED_SCHEDULERS:
            raise ScheduleError(f"scheduler {name} is not supported: bigsid needs a discrete-time VP (DDPM-family) "
                                f"or a rectified-flow schedule, one of {', '.join(SUPPORTED_SCHEDULERS)}")
        kind = FlowSchedule if name == "FlowMatchEulerDiscreteScheduler" else VPSchedule
        if cls is not Schedule and kind is not cls:
            raise ScheduleError(f"scheduler {name} is a {kind.kind} schedule, not {cls.kind}")
        return kind._from_config(config, prediction_type)

    @property
    def num_timesteps(self) -> int:
        return self.a.numel()

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network was trained to be called at, for grid times t."""
        return self.timesteps[t]

    def coeffs(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t, s_t for integer timesteps t[B], shaped to broadcast against a [B, ...] tensor of `ndim` dims."""
        shape = (-1,) + (1,) * (ndim - 1)
        return self.a[t].view(shape), self.s[t].view(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coeffs(t, x0.ndim)
        return a * x0 + s * eps

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Convert a network output between epsilon, v_prediction (v = a eps - s x0), flow (u = eps - x0) and
        sample (x0), from x_t = a x0 + s eps alone: the formulas hold on both schedules (a^2 + s^2 = 1 on VP, a + s
        = 1 on flow, but neither is assumed), and none divides by a_t unless the network predicts eps."""
        if src == dst:
            return pred
        a, s = self.coeffs(t, x_t.ndim)
        # float64 callers (tests, exact references) get float64 arithmetic on the same coefficient values
        a, s = (c.to(torch.promote_types(c.dtype, x_t.dtype)) for c in (a, s))
        if src == "epsilon":
            x0 = (x_t - s * pred) / a
        elif src == "v_prediction":
            x0 = (a * x_t - s * pred) / (a.square() + s.square())
        elif src == "flow":
            x0 = (x_t - s * pred) / (a + s)
        else:
            x0 = pred
        if dst == "sample":
            return x0
        eps = pred if src == "epsilon" else (x_t - a * x0) / s
        if dst == "epsilon":
            return eps
        return a * eps - s * x0 if dst == "v_prediction" else eps - x0

    def sample_t(self, n: int, t_min: int, t_max: int, device, generator: torch.Generator | None = None,
                 power: float = 1.0):
        """t ~ U{t_min..t_max}, the discrete uniform the SiD-LSG and DMD code use. On a flow teacher's grid that is
        sigma = shift(u) for uniform u: the noise levels the teacher's own sampler spaces its steps by.

        power p != 1: t = t_min + (t_max - t_min) u^(1/p), rounded, for u ~ U(0, 1): density proportional to
        (t - t_min)^(p - 1), so p > 1 draws large t more often."""
        if power == 1.0:
            return torch.randint(t_min, t_max + 1, (n,), device=device, generator=generator)
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        return (t_min + (t_max - t_min) * u.pow(1 / power)).round().long()

    def nearest_t(self, sigma: float) -> int:
        """The grid time whose VE noise level s_t / a_t is closest to `sigma` (SIM's "generator input at sigma
        2.5" on any schedule)."""
        ve = (self.s / self.a.clamp_min(1e-12)).double()
        return int((ve - sigma).abs().argmin())


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def vp_scheduler(config: dict) -> DDPMScheduler:
    """The forward process of a DDPM-family scheduler config, as DDPMScheduler computes it from the keys that set
    its betas: the training schedule and the export's scheduler both take it from here, so no key reaches one and
    not the other.

    use_karras_sigmas (like use_exponential_sigmas and use_beta_sigmas) only respaces a sampler's steps over these
    betas, and the export ships its own scheduler without it, so it is accepted."""
    name = config.get("_class_name", "DDPMScheduler")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ScheduleError(f"scheduler config {name} has timestep_type={config['timestep_type']!r}: bigsid calls a "
                            "VP teacher's network at its integer training timesteps, so it needs a teacher trained on "
                            "them (timestep_type 'discrete')")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ScheduleError(f"scheduler config {name} has beta_schedule={config['beta_schedule']!r}, which bigsid does "
                            f"not reproduce: one of {', '.join(BETA_SCHEDULES)}, or the betas themselves as "
                            "trained_betas")
    # A zero terminal SNR makes abar_T = 0: an eps-prediction has no x0 there, and the noise level s_t / a_t the
    # objectives weight by is infinite. Training without the rescale would distil another schedule than the
    # teacher's, and the export (which would apply it) would then disagree with training.
    if config.get("rescale_betas_zero_snr"):
        raise ScheduleError(f"scheduler config {name} has rescale_betas_zero_snr=true: bigsid does not distil "
                            "zero-terminal-SNR teachers (abar_T = 0). If the teacher was trained without the "
                            "rescale, remove the key from its scheduler_config.json")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})


class VPSchedule(Schedule):
    """Discrete-time VP schedule (DDPM family)."""

    kind = "VP"
    prediction_types = ("epsilon", "v_prediction", "sample")

    @classmethod
    def _from_config(cls, config: dict, prediction_type: str) -> "VPSchedule":
        # diffusers' own fp32 cumulative product, which the exported scheduler computes alike from the same betas
        abar = vp_scheduler(config).alphas_cumprod.double()
        return cls(abar.sqrt(), (1 - abar).sqrt(), torch.arange(abar.numel()),
                   prediction_type or config.get("prediction_type", "epsilon"))


class FlowSchedule(Schedule):
    """Rectified flow with the teacher's static timestep shift (SD3: 3.0)."""

    kind = "rectified-flow"
    prediction_types = ("flow", "sample")

    @classmethod
    def _from_config(cls, config: dict, prediction_type: str) -> "FlowSchedule":
        # resolution-dependent shifts (FLUX) and remapped sigma grids change sigma per image size or per sampler:
        # not a fixed training schedule this engine can index
        if config.get("use_dynamic_shifting") or any(config.get(k) for k in (
                "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal", "invert_sigmas")):
            raise ScheduleError("FlowMatchEulerDiscreteScheduler with dynamic shifting or a remapped sigma grid is "
                                "not supported: bigsid needs the static-shift rectified flow of SD3-class teachers")
        n, shift = int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0))
        u = torch.arange(1, n + 1, dtype=torch.float64) / n
        sigma = shift * u / (1 + (shift - 1) * u)
        return cls(1 - sigma, sigma, (sigma * n).float(), prediction_type or "flow")
