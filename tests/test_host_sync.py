"""No host synchronisation in a step that does not log, sample, evaluate, checkpoint or poll.

On an accelerator the host waits for the device whenever it reads a value back (`.item()`, `bool(tensor)`, a
boolean mask's size, an all-reduced flag) and the queue of launched work drains. Tests run on the CPU, where such
reads cost nothing, so they are counted instead: every dispatched op whose result is a host value or whose output
shape depends on tensor values (torch tags these data_dependent_output and dynamic_output_shape), and the calls
that read outside the dispatcher (tolist, numpy, torch.cuda.synchronize)."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bigsid.config import load_config
from bigsid.trainer import Trainer
from conftest import TINY_TOY

WAITS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


def waits_for_device(func, args) -> bool:
    if func is torch.ops.aten.index.Tensor:  # integer indices are plain gathers; a boolean mask has a data size
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return any(tag in func.tags for tag in WAITS)


class HostReads(TorchDispatchMode):
    """Records (what, where) for every read; `where` is what the test says the code is doing at the time."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.where, self.reads = "set-up", []
        for name in ("tolist", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._counted("cuda.synchronize", torch.cuda.synchronize))

    def _counted(self, name, inner):
        def call(*args, **kwargs):
            self.reads.append((name, self.where))
            return inner(*args, **kwargs)
        return call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if waits_for_device(func, args):
            self.reads.append((str(func), self.where))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_each_kind_of_host_read(monkeypatch):
    t = torch.tensor([1.0, float("nan")])
    with HostReads(monkeypatch) as reads:
        float(t[0]), bool(t[0] > 0), t[torch.isfinite(t)], t.tolist(), t[torch.tensor([1])]  # the last one: no read
    assert [r for r, _ in reads.reads] == ["aten._local_scalar_dense.default"] * 2 + ["aten.index.Tensor", "tolist"]


# Ten steps polling and logging every 5, a few-step generator (its prefix length is drawn on the host) and a NaN
# sample at step 3 (skipped and counted on the device).
STEPS = [*TINY_TOY, "train.total_nimg=320", "train.poll_every=5", "train.log_every=5", "train.checkpoint_every=0",
         "generator.steps=2"]


def host_reads_of_ten_steps(tr: Trainer, monkeypatch) -> set[str]:
    """Where the host read from the device while `tr` ran STEPS: "train_step" or "after step N"."""
    inner_step, inner_loss = tr.train_step, tr.objective.generator_loss

    def step():
        reads.where = "train_step"
        try:
            return inner_step()
        finally:
            reads.where = f"after step {tr.step}"

    def loss(*args, **kwargs):
        value, metrics = inner_loss(*args, **kwargs)
        return (value.index_fill(0, torch.tensor([0]), float("nan")) if tr.step == 2 else value), metrics

    tr.train_step, tr.objective.generator_loss = step, loss
    with HostReads(monkeypatch) as reads:
        tr._loop(10, None, 0.0, 0, flag=type("NoSignal", (), {"signum": None})())
    assert tr.step == 10
    return {where for _, where in reads.reads}


def test_steps_between_polls_never_wait_for_the_device(tmp_path, monkeypatch):
    """Host reads only at the poll and log steps 5 and 10, outside train_step."""
    tr = Trainer(load_config(None, [*STEPS, f"train.run_dir={tmp_path}"]))
    assert host_reads_of_ten_steps(tr, monkeypatch) == {"after step 5", "after step 10"}
    assert tr.skipped == {"nan_samples": 1, "nonfinite_steps": 1}


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_steps_between_polls_never_wait_for_the_device_on_two_ranks(tmp_path, backend):
    """The same on 2 gloo ranks: gradient reduction (fsdp2: sharded weights, the global norm of DTensor gradients,
    the fused step on DTensors) reads nothing back; the NaN sample of each rank is counted once."""
    from test_parallel import launch

    launch(2, [*STEPS, f"train.run_dir={tmp_path / 'run'}", f"parallel.backend={backend}"],
           report=str(tmp_path / "r"), host_reads=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"r.rank{rank}.json").read_text())
        assert set(report["host_reads"]) == {"after step 5", "after step 10"}, (rank, report["host_reads"])
        assert report["skipped"] == {"nan_samples": 2, "nonfinite_steps": 1}


def test_phases_are_clocked_at_log_steps_only_and_drain_the_device_there(tmp_path, monkeypatch):
    """The clock as it runs on CUDA (the allocator's counters faked: this is a CPU test): it drains the device around
    each phase of the log steps and around checkpoints, nowhere else, and each log row holds its measurements."""
    import json

    from bigsid.trainer import PhaseClock

    tr = Trainer(load_config(None, [*TINY_TOY, f"train.run_dir={tmp_path}", "train.total_nimg=192",
                                    "train.poll_every=3", "train.log_every=3", "train.checkpoint_every=2"]))
    allocated = iter(range(1, 10**6))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(allocated) * 2**30)
    tr.clock = PhaseClock(torch.device("cuda"))
    inner = tr.train_step

    def step():
        reads.where = f"step {tr.step + 1}"
        try:
            return inner()
        finally:
            reads.where = f"after step {tr.step}"

    tr.train_step = step
    with HostReads(monkeypatch) as reads:
        monkeypatch.setattr(torch.cuda, "synchronize", reads._counted("cuda.synchronize", lambda device: None))
        tr._loop(6, None, 0.0, 0, flag=type("NoSignal", (), {"signum": None})())
    drains = [where for what, where in reads.reads if what == "cuda.synchronize"]
    # before and after each of 5 phases (prompts encoded twice: one per network's phase); around each checkpoint
    assert drains == ["after step 2"] * 2 + ["step 3"] * 10 + ["after step 4"] * 2 + ["step 6"] * 10 + \
        ["after step 6"] * 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    phases = ("text_encoding", "fake_score", "generator", "ema")
    for row in rows:  # the checkpoint of step 2 in row 3, of step 4 in row 6
        assert all(row[f"time/{p}_s"] > 0 and row[f"memory/{p}_gib"] > 0 for p in phases), row
        assert row["time/checkpoint_s"] > 0
        assert row["memory/peak_gib"] == max(v for k, v in row.items() if k.startswith("memory/"))
