"""Parallel backends: one module each, one interface (base.Backend) the trainer uses unchanged."""

from bigsid.config import Config
from bigsid.parallel.base import Backend, Trainable


def build_backend(cfg: Config) -> Backend:
    if cfg.parallel.backend == "local":
        from bigsid.parallel.local import LocalBackend

        return LocalBackend(cfg)
    raise ValueError(f"parallel.backend={cfg.parallel.backend!r} is not available")  # config validation guards this


__all__ = ["Backend", "Trainable", "build_backend"]
