"""Entry point of the 2-rank gloo tests: one Trainer per process, as torchrun would start it."""

import json
import os
import sys


def run(rank: int, world: int, port: int, overrides: list[str], report: str | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    from bigsid.config import load_config
    from bigsid.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    trainer.run()
    if report:
        def local_bytes(tensors):
            return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)

        params = [p for tr in (trainer.generator, trainer.fake_score) for p in tr.params]
        states = [v for tr in (trainer.generator, trainer.fake_score) for s in tr.optimizer.state.values()
                  for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        with open(f"{report}.rank{rank}.json", "w") as f:
            json.dump({"param_bytes": local_bytes(params), "optim_bytes": local_bytes(states)}, f)
    dist.destroy_process_group()
