"""One process, one device: the reference every other backend is checked against."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bigsid.parallel.base import Backend, Trainable


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LocalBackend(Backend):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.device = pick_device(cfg.train.device)

    def prepare(self, networks):
        for net in (networks.teacher, networks.generator, networks.fake_score, networks.encoder):
            net.to(self.device)
        if networks.vae is not None:
            networks.vae.to(self.device)
        o = self.cfg.optim
        generator = Trainable(networks.generator, self.make_optimizer(networks.generator, o.lr_generator), o.grad_clip)
        fake_score = Trainable(networks.fake_score, self.make_optimizer(networks.fake_score, o.lr_fake_score),
                               o.grad_clip)
        return generator, fake_score

    def save(self, folder: Path, trainables, tensors):
        for name, tr in trainables.items():
            save_file({k: v.contiguous() for k, v in tr.module.state_dict().items()}, folder / f"{name}.safetensors")
            torch.save(tr.optimizer.state_dict(), folder / f"{name}.optim.pt")
        for name, group in tensors.items():
            save_file({k: v.contiguous() for k, v in group.items()}, folder / f"{name}.safetensors")

    def load(self, folder: Path, trainables):
        for name, tr in trainables.items():
            tr.module.load_state_dict(load_file(folder / f"{name}.safetensors", device=str(self.device)))
            # weights_only: a checkpoint never gets to run code on load
            tr.optimizer.load_state_dict(torch.load(folder / f"{name}.optim.pt", map_location=self.device,
                                                    weights_only=True))
        return {p.stem: load_file(p, device=str(self.device)) for p in folder.glob("*.safetensors")
                if p.stem not in trainables}
