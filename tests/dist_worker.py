"""The multi-process tests' launcher (start_ranks) and the 2-rank gloo runs' entry point (run): one Trainer per
process, as torchrun would start it."""

import faulthandler
import gc
import itertools
import json
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path


def _port_band() -> range:
    """This pytest-xdist worker's own band of ports, below the kernel's ephemeral range. Ports picked by binding to
    port 0 race: the kernel hands the same range to every gloo listener and TCP client, so another test's process
    can take the port between the pick and the TCPStore's bind (EADDRINUSE). Below that range no kernel-assigned
    port lands, and disjoint bands keep the two xdist workers off each other's picks."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        ephemeral = 32768
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    width = 1000
    start = max(ephemeral - 8 * width, 1024) + (worker % 8) * width
    return range(start, start + width)


_PORTS = itertools.cycle(_port_band())


def free_port() -> int:
    """The next port of this worker's band that nothing listens on (other programs may use the band too)."""
    for port in itertools.islice(_PORTS, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_port_band()}: something on this machine holds them all")


# What a rank imports, the lazy imports of a run included (the toy truth, the data stream, plots, TensorBoard, the
# diffusers and transformers networks a teacher folder loads, peft, DeepSpeed and the optimizers it checks). A
# spawned rank imported it all again: about 10 s of CPU on 2 cores, per rank and launch, the suite's largest cost.
# A forkserver imports it once per pytest worker and forks each rank.
PRELOAD = ["torch.distributed.fsdp", "torch._dynamo", "bigsid.trainer", "bigsid.parallel.fsdp2",
           "bigsid.parallel.deepspeed", "bigsid.toy", "bigsid.data", "bigsid.families", "matplotlib.pyplot",
           "torch.utils.tensorboard", "diffusers.models.unets.unet_2d_condition",
           "diffusers.models.autoencoders.autoencoder_kl", "transformers.models.clip.modeling_clip", "peft",
           "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer", "dist_worker"]


def _as_spawned(rank: int, fn, env: dict, args: tuple, logs: str) -> None:
    # the server keeps the environment of the test that first started it; each rank gets its own test's, as spawn
    # gives it
    os.environ.clear()
    os.environ.update(env)
    # the server's stdout and stderr are those of the test that started it, which pytest has long since read: a
    # rank writes to its own file, and a crash in native code (gloo's abort) prints the Python stacks there too
    log = open(f"{logs}/rank{rank}.log", "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log, all_threads=True)
    # the inherited modules' objects are never garbage: frozen, gc.collect (DeepSpeed runs it whenever it empties
    # its partition cache) no longer walks them
    gc.freeze()
    fn(rank, *args)
    Path(f"{logs}/rank{rank}.done").touch()


def _printed(logs: str, nprocs: int) -> str:
    parts = []
    for rank in range(nprocs):
        log = Path(f"{logs}/rank{rank}.log")
        parts.append(f"--- rank {rank} printed (the end):\n" +
                     (log.read_text(errors="replace")[-12000:] if log.exists() else "(nothing)"))
    return "\n".join(parts)


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """fn(rank, *args) in nprocs processes, each with this process's environment and none of its state, as
    torch.multiprocessing's spawn runs it; a rank's exception is raised here, with what each rank printed.

    A rank killed by a signal is a crash in native code, not a failed check: a CI run lost the fsdp2 loading set-up,
    which passes in the other CI runs on record, to one rank's SIGABRT (gloo is known to abort a process, from its
    own I/O thread, when a peer closes connections it still holds). Where every rank had returned from fn, the
    work is whole and the crash is reported as a warning; where one had not, the launch runs once more, with a
    warning, and a second crash fails the test."""
    import torch.multiprocessing as mp

    mp.set_forkserver_preload(PRELOAD)  # no effect once this worker's server runs
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="ranks") as logs:
            try:
                mp.start_processes(_as_spawned, args=(fn, dict(os.environ), args, logs), nprocs=nprocs,
                                   start_method="forkserver")
                return
            except mp.ProcessExitedException as error:
                if error.signal_name is None or attempt == 2:
                    error.add_note(_printed(logs, nprocs))
                    raise
                finished = all(Path(f"{logs}/rank{rank}.done").exists() for rank in range(nprocs))
                warnings.warn(f"rank {error.error_index} died by {error.signal_name} "
                              f"{'after' if finished else 'before'} every rank's work was done"
                              f"{'' if finished else '; launching again'}:\n{_printed(logs, nprocs)}")
                if finished:
                    return
            except Exception as error:
                error.add_note(_printed(logs, nprocs))
                raise


def run(rank: int, world: int, port: int, overrides: list[str], report: str | None,
        poison: tuple[int, int] | None = None, host_reads: bool = False) -> None:
    """`report`: write this rank's parameter and optimizer bytes and skip counts to {report}.rank{rank}.json.
    `poison` = (rank, step): that rank's generator loss is NaN at that step, on no other rank. `host_reads`: run
    test_host_sync's ten steps instead of the run, and report where the host read from the device."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    from bigsid.config import load_config
    from bigsid.parallel.dist import leave_process_group
    from bigsid.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    if poison is not None and poison[0] == rank:
        inner = trainer.objective.generator_loss

        def poisoned(*a, **k):
            loss, metrics = inner(*a, **k)
            return (loss * float("nan") if trainer.step == poison[1] else loss), metrics

        trainer.objective.generator_loss = poisoned
    if host_reads:
        import pytest
        from test_host_sync import host_reads_of_ten_steps

        with pytest.MonkeyPatch.context() as monkeypatch:
            reads = sorted(host_reads_of_ten_steps(trainer, monkeypatch))
        with open(f"{report}.rank{rank}.json", "w") as f:
            json.dump({"host_reads": reads, "skipped": trainer.skipped}, f)
    else:
        trainer.run()
    if report and not host_reads:
        def local_bytes(tensors):
            return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)

        trainables = (trainer.generator, trainer.fake_score)
        params = [p for tr in trainables for p in tr.stored_params()]
        states = [v for tr in trainables for s in tr.optimizer.state.values()
                  for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        # ZeRO's optimizer steps fp32 master partitions (its wrapped optimizer's parameters): under ZeRO-2 a copy
        # beside the whole weights, under ZeRO-3 the weights' own partitions; counted once per storage
        masters = [p for tr in trainables for g in getattr(tr.optimizer, "optimizer", tr.optimizer).param_groups
                   for p in g["params"] if getattr(tr.optimizer, "optimizer", None) is not None]
        teacher = [getattr(p, "ds_tensor", p) for p in trainer.teacher.parameters()]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in params + masters]
        weight_bytes = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in local}.values())
        with open(f"{report}.rank{rank}.json", "w") as f:
            json.dump({"param_bytes": local_bytes(params), "optim_bytes": local_bytes(states),
                       "weight_bytes": weight_bytes, "teacher_bytes": local_bytes(teacher),
                       "ema_bytes": local_bytes(trainer.ema.shadow), "skipped": trainer.skipped,
                       "encoder_bytes": local_bytes(trainer.networks.encoder.parameters())}, f)
    leave_process_group()
