"""One process, one device: the reference every other backend is checked against.

Full (unsharded) state: safetensors for weights and EMA, weights_only torch files for optimizer states."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bigsid.checkpoint import read_rank_state, reading
from bigsid.parallel.base import Backend, BackendError, Trainable


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)


def _host_copy(tree):
    """Tensors of a nested dict/list copied to host memory, everything else as it is."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host_copy(v) for v in tree)
    return tree


class LocalBackend(Backend):
    _writer: ThreadPoolExecutor | None = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.device = pick_device(cfg.train.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if type(self) is LocalBackend and world > 1:  # N independent trainers would share one run directory
            raise BackendError(f"parallel.backend=local runs one process, but torchrun started WORLD_SIZE={world}: "
                               "set parallel.backend=ddp or fsdp2, or launch one process")

    def prepare(self, networks):
        self.place(networks)
        o = self.cfg.optim
        return (Trainable(networks.generator, self.make_optimizer(networks.generator, o.lr_generator), o.grad_clip),
                Trainable(networks.fake_score, self.make_optimizer(networks.fake_score, o.lr_fake_score),
                          o.grad_clip))

    def save(self, folder, trainables, ema, rank_state, asynchronous=False):
        _save_tensors(rank_state, folder / f"rank{self.rank}.safetensors")
        if not self.is_main:  # full state is the same on every rank: one writer
            return None
        states = {name: (tr.inner.state_dict(), tr.optimizer.state_dict()) for name, tr in trainables.items()}
        ema = dict(ema)
        if asynchronous:  # a host copy now; training may change the originals while the writer runs
            states, ema = _host_copy(states), _host_copy(ema)

        def write():
            for name, (weights, optim) in states.items():
                _save_tensors(weights, folder / f"{name}.safetensors")
                torch.save(optim, folder / f"{name}.optim.pt")
            _save_tensors(ema, folder / "ema.safetensors")

        if not asynchronous:
            return write()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        return self._writer.submit(write)

    def load(self, folder, trainables, ema):
        device = str(self.device)
        for name, tr in trainables.items():
            path = folder / f"{name}.safetensors"
            with reading(path):
                tr.inner.load_state_dict(load_file(path, device=device))
            path = folder / f"{name}.optim.pt"
            with reading(path):  # weights_only: loading a checkpoint never runs code from it
                tr.optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        path = folder / "ema.safetensors"
        with reading(path), torch.no_grad():
            saved = load_file(path, device=device)
            for k, v in ema.items():
                v.copy_(saved[k])
        return read_rank_state(folder, self.rank)
