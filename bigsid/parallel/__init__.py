"""Parallel backends: one module each, one interface (base.Backend) the trainer uses unchanged."""

from bigsid.config import Config
from bigsid.parallel.base import Backend, Trainable


def build_backend(cfg: Config) -> Backend:
    name = cfg.parallel.backend
    if name == "local":
        from bigsid.parallel.local import LocalBackend

        return LocalBackend(cfg)
    if name == "ddp":
        from bigsid.parallel.ddp import DDPBackend

        return DDPBackend(cfg)
    if name == "deepspeed":
        from bigsid.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    from bigsid.parallel.fsdp2 import FSDP2Backend

    return FSDP2Backend(cfg)


__all__ = ["Backend", "Trainable", "build_backend"]
