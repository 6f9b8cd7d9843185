"""DistributedDataParallel: every rank holds full copies; gradients of the trained network are all-reduced.

The fake score is wrapped for its own phase only: in the generator phase the bare network is called
(Trainable.frozen), so DDP never waits for gradients of parameters that are frozen."""

from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel

from bigsid.parallel.base import Trainable
from bigsid.parallel.dist import Collectives, init_process_group
from bigsid.parallel.local import LocalBackend


class DDPBackend(Collectives, LocalBackend):
    def __init__(self, cfg):
        LocalBackend.__init__(self, cfg)
        self.rank, self.world_size, self.device = init_process_group(cfg.train.device)

    def prepare(self, networks):
        self.place(networks)
        o = self.cfg.optim
        ids = [self.device.index] if self.device.type == "cuda" else None
        trainables = []
        for net, lr in ((networks.generator, o.lr_generator), (networks.fake_score, o.lr_fake_score)):
            # broadcasts rank 0's weights; gradients live in the all-reduce buckets instead of beside them
            wrapped = DistributedDataParallel(net, device_ids=ids, gradient_as_bucket_view=True)
            # objectives read how a denoiser parameterises its output from the module they are handed
            wrapped.prediction_type = getattr(net, "prediction_type", None)
            trainables.append(DDPTrainable(wrapped, self.make_optimizer(net, lr), o.grad_clip, inner=net))
        return tuple(trainables)


class DDPTrainable(Trainable):
    def micro_step(self, sync):
        # Gradients of earlier micro-batches stay local; the last backward all-reduces their sum. DDP decides in
        # forward whether the coming backward reduces, so no_sync must hold the forward too.
        return contextlib.nullcontext() if sync else self.module.no_sync()
