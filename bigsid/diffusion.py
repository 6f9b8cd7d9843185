"""VP diffusion maths on whole batches: x_t = a_t * x0 + s_t * eps with a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t).

The schedule comes from the teacher's own diffusers scheduler config, so teacher, generator and fake score
agree with the network that was pretrained on it. Every conversion is closed form over the batch.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

SUPPORTED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                        "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                        "UniPCMultistepScheduler", "HeunDiscreteScheduler", "LCMScheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class ScheduleError(ValueError):
    """A teacher scheduler this engine cannot reproduce."""


# Stable Diffusion 1.x/2.x training schedule; the toy teacher uses it so toy numbers transfer to SD.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


class VPSchedule(torch.nn.Module):
    """Discrete-time VP schedule indexed by integer t in [0, num_train_timesteps)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ScheduleError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        abar = alphas_cumprod.double()
        self.register_buffer("a", abar.sqrt().float(), persistent=False)
        self.register_buffer("s", (1 - abar).sqrt().float(), persistent=False)

    @classmethod
    def from_scheduler_config(cls, config: dict, prediction_type: str = "") -> "VPSchedule":
        name = config.get("_class_name", "DDPMScheduler")
        if name not in SUPPORTED_SCHEDULERS:
            raise ScheduleError(f"scheduler {name} is not supported: bigsid needs a discrete-time VP (DDPM-family) "
                                f"schedule, one of {', '.join(SUPPORTED_SCHEDULERS)}")
        if config.get("timestep_type", "discrete") != "discrete" or config.get("use_karras_sigmas") \
                or config.get("beta_schedule", "linear") not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ScheduleError(f"scheduler config {name} with beta_schedule={config.get('beta_schedule')!r} is not a "
                                "discrete VP schedule bigsid can reproduce")
        # Only the betas matter for the forward process; clip_sample would clamp latents, so force it off.
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None}, clip_sample=False)
        return cls(ddpm.alphas_cumprod, prediction_type or config.get("prediction_type", "epsilon"))

    @property
    def num_timesteps(self) -> int:
        return self.a.numel()

    def coeffs(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t, s_t for integer timesteps t[B], shaped to broadcast against a [B, ...] tensor of `ndim` dims."""
        shape = (-1,) + (1,) * (ndim - 1)
        return self.a[t].view(shape), self.s[t].view(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coeffs(t, x0.ndim)
        return a * x0 + s * eps

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Convert a network output between epsilon, v_prediction and sample (x0) parameterisations."""
        if src == dst:
            return pred
        a, s = self.coeffs(t, x_t.ndim)
        if src == "epsilon":
            x0 = (x_t - s * pred) / a
        elif src == "v_prediction":
            x0 = a * x_t - s * pred
        else:
            x0 = pred
        if dst == "sample":
            return x0
        eps = (x_t - a * x0) / s if src != "epsilon" else pred
        if dst == "epsilon":
            return eps
        return a * eps - s * x0  # v = a * eps - s * x0

    def sample_t(self, n: int, t_min: int, t_max: int, device, generator: torch.Generator | None = None):
        """t ~ U{t_min..t_max}, the discrete uniform the SiD-LSG and DMD code use."""
        return torch.randint(t_min, t_max + 1, (n,), device=device, generator=generator)
