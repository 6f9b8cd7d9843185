"""One process, one device: the reference every other backend is checked against.

Full (unsharded) state: safetensors for weights and EMA, weights_only torch files for optimizer states."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bigsid.parallel.base import Backend, BackendError, Trainable


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


class LocalBackend(Backend):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.device = pick_device(cfg.train.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if type(self) is LocalBackend and world > 1:  # N independent trainers would share one run directory
            raise BackendError(f"parallel.backend=local runs one process, but torchrun started WORLD_SIZE={world}: "
                               "set parallel.backend=ddp or fsdp2, or launch one process")

    def place(self, networks) -> None:
        for net in (networks.teacher, networks.generator, networks.fake_score, networks.encoder, networks.vae):
            if net is not None:
                net.to(self.device)

    def prepare(self, networks):
        self.place(networks)
        o = self.cfg.optim
        return (Trainable(networks.generator, self.make_optimizer(networks.generator, o.lr_generator), o.grad_clip),
                Trainable(networks.fake_score, self.make_optimizer(networks.fake_score, o.lr_fake_score),
                          o.grad_clip))

    def save(self, folder, trainables, ema, rank_state):
        if self.is_main:  # full state is the same on every rank: one writer
            for name, tr in trainables.items():
                _save_tensors(tr.inner.state_dict(), folder / f"{name}.safetensors")
                torch.save(tr.optimizer.state_dict(), folder / f"{name}.optim.pt")
            _save_tensors(ema, folder / "ema.safetensors")
        _save_tensors(rank_state, folder / f"rank{self.rank}.safetensors")

    def load(self, folder, trainables, ema):
        device = str(self.device)
        for name, tr in trainables.items():
            tr.inner.load_state_dict(load_file(folder / f"{name}.safetensors", device=device))
            # weights_only: loading a checkpoint never runs code from it
            tr.optimizer.load_state_dict(torch.load(folder / f"{name}.optim.pt", map_location=device,
                                                    weights_only=True))
        saved = load_file(folder / "ema.safetensors", device=device)
        with torch.no_grad():
            for k, v in ema.items():
                v.copy_(saved[k])
        own = folder / f"rank{self.rank}.safetensors"
        return load_file(own) if own.is_file() else None
