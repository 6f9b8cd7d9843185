"""Distillation objectives: per-sample losses, no optimizer or collective inside."""

from bigsid.config import ObjectiveConfig
from bigsid.diffusion import VPSchedule
from bigsid.objectives.base import Objective
from bigsid.objectives.dmd import DMD
from bigsid.objectives.sid import SiD
from bigsid.objectives.sim import SIM

OBJECTIVES = {"sid": SiD, "sim": SIM, "dmd": DMD}


def build_objective(cfg: ObjectiveConfig, schedule: VPSchedule) -> Objective:
    return OBJECTIVES[cfg.name](cfg, schedule)


__all__ = ["Objective", "SiD", "SIM", "DMD", "build_objective", "OBJECTIVES"]
