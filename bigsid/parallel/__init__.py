"""Parallel backends: one module each, one interface (base.Backend) the trainer uses unchanged."""

from bigsid.config import Config
from bigsid.parallel.base import Backend, Trainable

# The checkpoint layout each backend writes and reads (on any world size): whole tensors in safetensors (local,
# DDP), torch.distributed.checkpoint shards (FSDP2), per-rank partitions (DeepSpeed).
CHECKPOINT_FORMATS = {"local": "whole", "ddp": "whole", "fsdp2": "dcp", "deepspeed": "deepspeed"}


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


__all__ = ["CHECKPOINT_FORMATS", "Backend", "Trainable", "build_backend"]
