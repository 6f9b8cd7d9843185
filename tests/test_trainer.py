"""The loop on the toy teacher: phase isolation, exact resume, NaN samples, metrics.jsonl across restarts,
bad-data counts, the run directory, learning."""

import json
import re

import pytest
import torch

from bigsid.checkpoint import complete_checkpoints
from bigsid.config import load_config
from bigsid.trainer import Trainer
from conftest import TINY_TOY


def make(tmp_path, *extra):
    return Trainer(load_config(None, [*TINY_TOY, f"train.run_dir={tmp_path}", *extra]))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def assert_same_state(a: Trainer, b: Trainer) -> None:
    """Generator, fake score and EMA bit-identical."""
    for x, y in ((a.generator.module, b.generator.module), (a.fake_score.module, b.fake_score.module)):
        for (k, vx), vy in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(vx, vy), k
    for vx, vy in zip(a.ema.shadow, b.ema.shadow):
        assert torch.equal(vx, vy)


def test_toy_teacher_is_the_fitted_network_both_trained_networks_start_from(tmp_path):
    from bigsid.toy import GMMDenoiser

    tr = make(tmp_path / "fitted")
    teacher, fake = tr.teacher.state_dict(), tr.fake_score.module.state_dict()
    assert teacher.keys() == fake.keys() and all(torch.equal(teacher[k], fake[k]) for k in teacher)
    torch.manual_seed(123)  # the fit is seeded by train.seed alone: `bigsid eval` rebuilds the same teacher
    again = make(tmp_path / "again").teacher.state_dict()
    assert all(torch.equal(teacher[k], again[k]) for k in teacher)
    assert isinstance(make(tmp_path / "exact", "teacher.gmm_teacher=exact").teacher, GMMDenoiser)


def test_each_phase_updates_only_its_own_network(tmp_path):
    tr = make(tmp_path)
    teacher_params = list(tr.teacher.parameters())
    teacher0 = snapshot(tr.teacher)
    gen0, fake0 = snapshot(tr.generator.module), snapshot(tr.fake_score.module)
    tr.fake_score_phase()
    assert not changed(gen0, tr.generator.module), "fake-score phase must leave the generator untouched"
    assert changed(fake0, tr.fake_score.module)
    gen1, fake1 = snapshot(tr.generator.module), snapshot(tr.fake_score.module)
    tr.generator_phase()
    assert not changed(fake1, tr.fake_score.module), "generator phase must not update the fake score"
    assert changed(gen1, tr.generator.module)
    assert all(p.grad is None for p in tr.fake_score.module.parameters())
    assert teacher_params and all(p.grad is None and not p.requires_grad for p in teacher_params)
    assert not changed(teacher0, tr.teacher)
    assert all(p.requires_grad for p in tr.fake_score.module.parameters()), "fake score unfrozen afterwards"


def test_generator_phase_backpropagates_through_the_teacher_input(tmp_path):
    """SiD's gradient flows through x_t into the frozen networks: the fake score's input gets a gradient."""
    tr = make(tmp_path)
    seen = []
    handle = tr.fake_score.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    tr.generator_phase()
    handle.remove()
    assert seen and all(seen)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = make(tmp_path / "full")
    full_result = full.run()
    # Stop after 5 steps (a checkpoint), then start the same run again: it resumes and finishes.
    part = make(tmp_path / "part", "train.total_nimg=160")
    part.run()
    resumed = make(tmp_path / "part")
    assert resumed.step == 5
    resumed.run()
    assert_same_state(full, resumed)
    rows = lambda p: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines() if "generator/loss" in l]
    full_rows, part_rows = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["generator/loss"] for r in full_rows] == [r["generator/loss"] for r in part_rows]
    assert full_result["fd_generator"] == resumed.last_eval["fd_generator"]


def test_a_checkpoint_written_before_a_key_existed_resumes_and_a_changed_value_is_refused(tmp_path, monkeypatch):
    """A key added to a section since the checkpoint was written reads as its default, one removed since is left
    out; a value that differs from the run's is still refused, with what to do."""
    from bigsid import checkpoint

    make(tmp_path, "train.total_nimg=160").run()
    read_state = checkpoint.read_state

    def written(objective_changes):
        def read(folder):
            state = read_state(folder)
            objective = {k: v for k, v in state["config"]["objective"].items() if k != "generator_t_power"}
            state["config"]["objective"] = objective | {"a_key_since_removed": 1} | objective_changes
            return state
        return read

    monkeypatch.setattr(checkpoint, "read_state", written({}))
    assert make(tmp_path).step == 5
    monkeypatch.setattr(checkpoint, "read_state", written({"alpha": 1.5}))
    with pytest.raises(checkpoint.CheckpointError, match="different objective config; resume with the run's own"):
        make(tmp_path)


def test_asynchronous_checkpoint_holds_its_own_step_while_training_goes_on(tmp_path):
    """Written in the background while steps 6..10 change the weights, step 5's checkpoint still resumes into
    the uninterrupted run."""
    import shutil

    full = make(tmp_path / "full", "train.async_checkpoint=true")
    full.run()
    assert [p.name for p in complete_checkpoints(tmp_path / "full")] == ["step-000000005", "step-000000010"]
    (tmp_path / "again" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000000005",
                    tmp_path / "again" / "checkpoints" / "step-000000005")
    resumed = make(tmp_path / "again")
    assert resumed.step == 5
    resumed.run()
    assert_same_state(full, resumed)


def test_half_written_checkpoint_is_ignored(tmp_path):
    tr = make(tmp_path, "train.total_nimg=160")
    tr.run()
    partial = tmp_path / "checkpoints" / "step-000000009.partial"
    partial.mkdir()
    (partial / "generator.safetensors").write_bytes(b"truncated")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000000005"]
    assert make(tmp_path).step == 5


def test_a_nan_sample_skips_the_update_and_is_counted(tmp_path):
    """One sample's NaN, written into an activation inside a network (trained or frozen) or into its loss, cannot
    be masked out of the gradients (0 x NaN in backward): the phase's update is skipped, the sample and the step
    are counted, and training goes on once the NaN is gone."""
    tr = make(tmp_path)
    nan_into_sample_0 = lambda module, args, out: out.index_fill(0, torch.tensor([0]), float("nan"))

    def poison_activation(network):  # the MLP's first SiLU
        body = network.net.body if hasattr(network, "net") else network.body
        return body[1].register_forward_hook(nan_into_sample_0).remove

    def poison_loss():
        inner = tr.objective.generator_loss
        tr.objective.generator_loss = lambda *a, **k: (nan_into_sample_0(None, None, inner(*a, **k)[0]), {})
        return lambda: delattr(tr.objective, "generator_loss")

    cases = [("generator", lambda: poison_activation(tr.generator.inner)),
             ("generator", lambda: poison_activation(tr.teacher)),  # frozen, but on the gradient's path
             ("generator", poison_loss),  # after every network: the one case masking the loss once got through
             ("fake_score", lambda: poison_activation(tr.fake_score.inner))]
    for skips, (name, poison) in enumerate(cases):
        trainable, phase = getattr(tr, name), getattr(tr, f"{name}_phase")
        before = snapshot(trainable.module)
        undo = poison()
        metrics = phase()
        undo()
        assert not changed(before, trainable.module), (skips, name)
        assert metrics[f"{name}/applied"] == 0 and not torch.isfinite(metrics[f"{name}/grad_norm"])
        assert tr.skip_counts() == {"nan_samples": skips + 1, "nonfinite_steps": skips + 1}
        metrics = phase()
        assert metrics[f"{name}/applied"] == 1 and changed(before, trainable.module), (skips, name)
        assert all(torch.isfinite(v).all() for v in trainable.module.state_dict().values())
        assert tr.skip_counts() == {"nan_samples": skips + 1, "nonfinite_steps": skips + 1}


def test_metrics_log_keeps_what_a_restart_does_not_redo(tmp_path, caplog, monkeypatch):
    import logging

    from bigsid import trainer
    from bigsid.trainer import MetricLog

    def write(*steps):
        log = MetricLog(tmp_path, True)
        for step in steps:
            log.write(step, 32 * step, {"loss": float(step)})
        log.close()
        return log

    def steps():
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    log = write(0, 2, 4, 5, 6)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "nimg": 2')  # a crash in the middle of a row
    caplog.set_level(logging.WARNING, logger="bigsid.trainer")
    log.truncate(5)  # resumed from a checkpoint at step 5: step 6 is redone, the torn row is gone
    assert steps() == [0, 2, 4, 5]
    assert any(str(tmp_path / "metrics.jsonl") in r.getMessage() and "last line" in r.getMessage()
               for r in caplog.records)
    log.write(6, 192, {"loss": 6.0})
    assert steps() == [0, 2, 4, 5, 6]
    log.truncate(0)  # a restart with no checkpoint redoes everything, the evaluation at step 0 too
    assert steps() == []

    write(0, 2, 4)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "nimg": 160}')  # a whole row that lost its newline: kept
    log.truncate(5)
    log.write(6, 192, {})
    assert steps() == [0, 2, 4, 5, 6]

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.os, "replace", crash)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(OSError):
        log.truncate(2)  # a rewrite that fails midway leaves the log as it was
    assert (tmp_path / "metrics.jsonl").read_text() == before
    monkeypatch.undo()
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'metrics.jsonl'} line 2")):
        log.truncate(2)


def test_tensorboard_shows_what_the_metrics_file_keeps_after_a_restart(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bigsid.trainer import MetricLog

    log = MetricLog(tmp_path, True)
    for step in (1, 2, 3, 4):
        log.write(step, 32 * step, {"loss": float(step)})
    log.close()  # killed after step 4; the checkpoint is at step 2
    log = MetricLog(tmp_path, True)
    log.truncate(2)
    log.write(3, 96, {"loss": 30.0})  # step 3 redone, with other values
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(32, 1.0), (64, 2.0), (96, 30.0)]


def test_metrics_rows_appear_once_however_the_run_is_restarted(tmp_path):
    """Crashed before its first checkpoint, then finished, then started again: the log holds the rows of an
    uninterrupted run, each once. (A resume from a checkpoint: the tests of bad-data counts and of kill -9.)"""
    args = ["train.eval_every=4"]
    rows = lambda: [(r["step"], "eval" if "eval/fd_generator" in r else "train")
                    for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    # log_every=2; evaluations at 0, 4, 8 and, after the final checkpoint, 10
    expected = [(0, "eval"), (2, "train"), (4, "train"), (4, "eval"), (6, "train"), (8, "train"), (8, "eval"),
                (10, "train"), (10, "eval")]
    tr = make(tmp_path, *args)
    inner = tr.train_step

    def step_or_crash():  # at step 3, before the first checkpoint (step 5)
        if tr.step == 3:
            raise RuntimeError("crash")
        return inner()

    tr.train_step = step_or_crash
    with pytest.raises(RuntimeError, match="crash"):
        tr.run()
    assert rows() == expected[:2]
    make(tmp_path, *args).run()
    assert rows() == expected
    make(tmp_path, *args).run()  # a finished run started again: its last evaluation is redone, not repeated
    assert rows() == expected


def test_weights_and_biases_gets_every_metrics_row_in_one_run_across_a_resume(tmp_path, monkeypatch):
    """A stand-in wandb module (no network): each row of metrics.jsonl reaches it once, at its step, and the run that
    resumes logs into the same W&B run."""
    import importlib.machinery
    import math
    import sys
    import types

    from bigsid.config import ConfigError

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    make(tmp_path, "train.wandb_project=distill", "train.total_nimg=160").run()  # stops at its checkpoint, step 5
    make(tmp_path, "train.wandb_project=distill").run()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    assert inits[0]["project"] == "distill" and inits[0]["config"]["train"]["wandb_project"] == "distill"
    assert [c[0] for c in calls].count("finish") == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))
                             and math.isfinite(v)}) for r in rows]
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == expected
    assert [step for step, _ in expected] == [2, 4, 5, 6, 8, 10, 10]  # train rows, and the evaluations at 5 and 10

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'bigsid[wandb]', or leave train.wandb_project")):
        make(tmp_path / "other", "train.wandb_project=distill")


def test_bad_data_counts_are_logged_kept_across_a_resume_and_summarised(tmp_path, caplog):
    import logging
    import tarfile

    from bigsid.config import DataConfig
    from bigsid.data import ISSUES, build_prompt_stream
    from test_data import write_tar

    good = write_tar(tmp_path / "good.tar", [("a0", {"txt": b"toy prompt 0"}), ("a1", {"txt": b"  "}),
                                             ("a2", {"txt": b"toy prompt 1"}), ("a3", {"jpg": b"..."})])
    cut = write_tar(tmp_path / "cut.tar", [(f"b{i}", {"txt": f"toy prompt {i % 2}".encode()}) for i in range(3)])
    with tarfile.open(cut) as tar:
        last = tar.getmembers()[-1]
    with open(cut, "r+b") as f:  # only the end-of-archive blocks are lost: all three prompts are still read
        f.truncate(last.offset_data + 512)
    data = ["data.source=webdataset", f"data.path={good}::{cut}"]
    caplog.set_level(logging.INFO)
    make(tmp_path / "run", *data, "train.total_nimg=160").run()  # stops at its checkpoint at step 5
    resumed = make(tmp_path / "run", *data)
    assert resumed.stream.stats()["prompts"] > 0  # the counts came back with the checkpoint
    resumed.run()

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "generator/loss" in r]
    per_step = (resumed.cfg.train.fake_steps + 1) * resumed.cfg.train.batch_size  # prompts each step takes
    reference = build_prompt_stream(DataConfig(source="webdataset", path=f"{good}::{cut}"),
                                    seed=resumed.cfg.train.seed)
    shards = {}
    for row in train_rows:  # an uninterrupted stream gives the same counts at every logged step
        reference.next_batch(row["step"] * per_step - reference.stats()["prompts"])
        stats = reference.stats()
        assert row["data/prompts"] == stats["prompts"] == row["step"] * per_step
        assert {k: row[f"data/{k}"] for k in ISSUES} == {k: (stats["skipped"] | stats["repaired"]).get(k, 0)
                                                          for k in ISSUES}, row["step"]
        shards |= row.get("data/by_shard", {})
        assert shards == stats["by_shard"], row["step"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10]  # once each, the resumed run's included
    assert row["data/bad_shard"] > 0 and row["data/empty_caption"] > 0
    assert set(shards) == {good, cut} and set(shards[cut]) == {"bad_shard"}
    summary = [r.getMessage() for r in caplog.records if r.name == "bigsid.trainer" and "prompt data" in r.getMessage()]
    assert len(summary) == 2 and f"bad_shard {row['data/bad_shard']}" in summary[-1] and cut in summary[-1]


def test_nonfinite_gradient_skips_the_update(tmp_path):
    tr = make(tmp_path)
    inner = tr.objective.generator_loss
    tr.objective.generator_loss = lambda *a, **k: (inner(*a, **k)[0] * float("inf"), {})
    before = snapshot(tr.generator.module)
    tr.generator_phase()
    assert tr.skip_counts()["nonfinite_steps"] == 1
    assert not changed(before, tr.generator.module)


def test_run_directory_and_learning(tmp_path):
    # A student fitted well enough to start from (as a real teacher's weights are): 100 iterations of SiD
    # must at least halve the Frechet distance to the exact samples (measured: 2.9 -> 1.3).
    tr = make(tmp_path, "teacher.student_width=256", "teacher.student_depth=3", "teacher.student_fit_steps=1000",
              "train.batch_size=128", "train.total_nimg=12800", "train.ema_halflife_nimg=5000", "train.eval_every=50",
              "train.sample_every=100", "train.checkpoint_every=50", "train.keep_checkpoints=2",
              "eval.num_samples=1000")
    result = tr.run()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start = next(r["eval/fd_generator"] for r in rows if "eval/fd_generator" in r and r["step"] == 0)
    assert result["fd_generator"] < start / 2, (start, result["fd_generator"])
    assert result["fd_reference"] < result["fd_generator"]
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "samples" / "step-000000100.png").is_file()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000000050", "step-000000100"]
    assert any((tmp_path / "tensorboard").iterdir())
    train_rows = [r for r in rows if "generator/loss" in r]
    assert len(train_rows) == 100 // 2
    assert {"fake_score/loss", "generator/grad_norm", "images_per_s", "nan_samples", "time/text_encoding_s",
            "time/fake_score_s", "time/generator_s", "time/ema_s"} <= set(train_rows[0])
    assert not any(k.startswith("memory/") for r in rows for k in r)  # the host has no allocator peak to report
    assert train_rows[25]["time/checkpoint_s"] > 0 and train_rows[25]["step"] == 52  # the checkpoint of step 50
    assert sum("eval/fd_generator" in r for r in rows) == 1 + 2  # before training, steps 50 and 100


def test_preemption_signal_checkpoints_then_resume_matches(tmp_path):
    import os
    import signal

    import pytest

    from bigsid.cli import main
    from bigsid.trainer import PREEMPTED_EXIT, Preempted

    # the signal lands on a step due for a metrics row, samples and an evaluation: none of them may be lost
    due = ["train.log_every=2", "train.sample_every=4", "train.eval_every=4"]
    full = make(tmp_path / "full", "train.checkpoint_every=0", *due)
    full.run()
    tr = make(tmp_path / "pre", "train.checkpoint_every=0", "train.poll_every=4", *due)
    inner = tr.train_step

    def step_then_signal():
        metrics = inner()
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM's --signal delivers
        return metrics

    tr.train_step = step_then_signal
    with pytest.raises(Preempted):
        tr.run()
    # the signal at step 3 is read at the next poll, step 4
    assert [p.name for p in complete_checkpoints(tmp_path / "pre")] == ["step-000000004"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGUSR1))
    # the same command again resumes at step 4 and ends where the uninterrupted run did
    args = [*TINY_TOY, f"train.run_dir={tmp_path / 'pre'}", "train.checkpoint_every=0", *due]
    assert main(["train", "-", *args]) == 0
    resumed = make(tmp_path / "pre", "train.checkpoint_every=0", *due)
    assert resumed.step == 10
    for va, vb in zip(full.generator.module.state_dict().values(), resumed.generator.module.state_dict().values()):
        assert torch.equal(va, vb)

    def rows(run):  # what each row holds, and the evaluations' values (timings differ between runs)
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], sorted(r), {k: v for k, v in r.items() if k.startswith("eval/")}) for r in rows]

    assert rows("pre") == rows("full")
    assert sorted(p.name for p in (tmp_path / "pre" / "samples").iterdir()) == \
        sorted(p.name for p in (tmp_path / "full" / "samples").iterdir())
    assert PREEMPTED_EXIT == 75


@pytest.mark.parametrize("poll_every,stop_step", [(1, 5), (4, 8)])
def test_consecutive_nonfinite_steps_stop_the_run_on_its_last_good_state(tmp_path, poll_every, stop_step):
    """Steps 3, 4, 5, ... are non-finite; the third in a row is seen at the first poll from step 5 on."""
    from bigsid.trainer import TrainingError

    args = ["train.max_consecutive_skips=3", "train.checkpoint_every=0", f"train.poll_every={poll_every}"]
    tr = make(tmp_path, *args)
    inner = tr.objective.generator_loss
    good = {}

    def poisoned(*a, **k):
        if tr.step == 2 and not good:
            good.update(snapshot(tr.generator.module))
        loss, metrics = inner(*a, **k)
        return (loss * float("nan") if tr.step >= 2 else loss), metrics

    tr.objective.generator_loss = poisoned
    with pytest.raises(TrainingError, match=f"3 steps in a row \\(up to step 5\\).*stopped at step {stop_step}"):
        tr.run()
    assert tr.step == stop_step and saved_skips(tmp_path) == stop_step - 2
    saved = make(tmp_path, *args)
    assert saved.step == stop_step
    assert not changed(good, saved.generator.module)


@pytest.mark.parametrize("factor,stops", [(1000, True), (0, False)])
def test_a_gradient_norm_jump_stops_the_run_on_its_last_good_state(tmp_path, factor, stops):
    """From step 81 the fake score's loss, and so its gradient norm, is 1e6 times what it was: weights and Adam's
    moments stay finite (Adam's step hardly changes), so only the jump against the median of the previous steps can
    stop the run, at the first poll from step 81 on. The 80 steps before it, the generator's norm rising from ~0
    (the fake score starts as the teacher) included, must not."""
    from bigsid.checkpoint import latest_checkpoint, read_state
    from bigsid.trainer import NORM_WINDOW, TrainingError

    args = ["train.total_nimg=3200", "train.checkpoint_every=20", f"train.divergence_factor={factor}"]
    tr = make(tmp_path, *args)
    inner = tr.objective.fake_score_loss

    def scaled(*a, **k):
        loss, metrics = inner(*a, **k)
        return (loss * 1e6 if tr.step >= 80 else loss), metrics

    tr.objective.fake_score_loss = scaled
    if not stops:
        tr.run()
        assert tr.step == 100
        return
    last = re.escape(f"{tmp_path / 'checkpoints' / 'step-000000080'} (run")
    with pytest.raises(TrainingError, match=f"fake_score gradient norm rose past .* at step 81: training diverged.*"
                                            f"{last}"):
        tr.run()
    assert tr.step == 90  # the first poll from step 81 on (train.poll_every=10)
    assert latest_checkpoint(tmp_path).name == "step-000000080"
    # the window of norms is saved with the checkpoint and restored, so a resumed run measures jumps as one
    # that was never interrupted
    window = read_state(latest_checkpoint(tmp_path))["norm_window"]
    assert len(window) == NORM_WINDOW and all(v is not None and v > 0 for row in window for v in row)
    resumed = make(tmp_path, *args)
    assert resumed.step == 80
    assert torch.equal(resumed.norm_window, torch.tensor(window))


def saved_skips(run_dir) -> int:
    from bigsid.checkpoint import latest_checkpoint, read_state

    return read_state(latest_checkpoint(run_dir))["skipped"]["nonfinite_steps"]


@pytest.mark.parametrize("network,checkpoint_every,last_good",
                         [("generator", 2, "step-000000002"), ("fake_score", 0, None)])
def test_nonfinite_weights_stop_the_run_and_are_never_saved(tmp_path, network, checkpoint_every, last_good):
    from safetensors.torch import load_file

    from bigsid.trainer import TrainingError

    # max_consecutive_skips=1: the steps after a broken update (NaN outputs, NaN gradients) would otherwise stop
    # the run by writing "the last good weights" at once
    tr = make(tmp_path, f"train.checkpoint_every={checkpoint_every}", "train.max_consecutive_skips=1")
    trainable = getattr(tr, network)
    update = trainable.optimizer.step

    def poisoned_update(*a, **k):  # the update of step 4 overflows one weight, as a huge learning rate would
        out = update(*a, **k)
        if tr.step == 3:
            with torch.no_grad():
                trainable.params[-1].view(-1)[-1] = float("inf")
        return out

    trainable.optimizer.step = poisoned_update
    expected = re.escape(f"{tmp_path / 'checkpoints' / last_good} (run") if last_good else "no complete checkpoint"
    with pytest.raises(TrainingError, match=f"{network} weights became non-finite in the update of step 4.*{expected}"):
        tr.run()
    # seen at the first poll from step 4 on: the checkpoint step 4, or the default poll at step 10
    assert tr.step == (4 if checkpoint_every else 10)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ([last_good] if last_good else [])
    for file in tmp_path.glob("checkpoints/*/*.safetensors"):  # partial folders included
        assert all(torch.isfinite(v).all() for v in load_file(file).values()), file


@pytest.mark.parametrize("network", ["generator", "fake_score"])
def test_nonfinite_adam_moments_stop_the_run_and_are_never_saved(tmp_path, network):
    """A gradient whose square overflows leaves the weights finite and Adam's second moment inf: the next poll stops
    the run, and the checkpoint of step 4 that would follow is never written."""
    from safetensors.torch import load_file

    from bigsid.trainer import TrainingError

    tr = make(tmp_path, "train.checkpoint_every=2")
    trainable = getattr(tr, network)
    update = trainable.optimizer.step

    def overflowing_update(*a, **k):
        out = update(*a, **k)
        if tr.step == 3:
            trainable.optimizer.state[trainable.params[0]]["exp_avg_sq"].view(-1)[0] = float("inf")
        return out

    trainable.optimizer.step = overflowing_update
    last_good = re.escape(str(tmp_path / "checkpoints" / "step-000000002"))
    with pytest.raises(TrainingError, match=f"{network} optimizer state .* non-finite by step 4.*{last_good}"):
        tr.run()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000000002"]
    assert all(torch.isfinite(p).all() for p in trainable.params)  # the weights never showed it
    for file in tmp_path.glob("checkpoints/*/*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(file).values()), file


def test_weights_check_sees_one_nan_and_passes_huge_finite_weights():
    from bigsid.parallel import Trainable

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    trainable = Trainable(net, torch.optim.Adam(net.parameters()), grad_clip=0.0)
    assert trainable.weights_finite()
    with torch.no_grad():
        net[0].weight.fill_(1e30)  # finite; its sum of squares (1e60 per element) would overflow float32
    assert trainable.weights_finite()
    with torch.no_grad():
        net[1].bias[-1] = float("nan")
    assert not trainable.weights_finite()


def test_cosine_schedule_decays_both_learning_rates_from_nimg(tmp_path):
    tr = make(tmp_path, "optim.lr_schedule=cosine", "optim.lr_min_ratio=0.1")
    tr.train_step()
    assert tr.fake_score.optimizer.param_groups[0]["lr"] == 1e-4  # factor 1 at nimg 0
    tr.nimg = tr.cfg.train.total_nimg // 2
    assert tr.lr_factor() == 0.1 + 0.9 * 0.5
    tr.train_step()
    assert tr.generator.optimizer.param_groups[0]["lr"] == 1e-4 * (0.1 + 0.9 * 0.5)
    tr.nimg = tr.cfg.train.total_nimg
    assert abs(tr.lr_factor() - 0.1) < 1e-12


def test_eval_command_writes_the_ground_truth_report(tmp_path, capsys):
    from bigsid.cli import main

    run = tmp_path / "run"
    assert main(["eval", str(run)]) == 2  # not a run directory
    assert "no such run directory" in capsys.readouterr().err
    assert main(["train", "-", *TINY_TOY, f"train.run_dir={run}", "train.eval_every=5"]) == 0
    trained = json.loads((run / "eval" / "toy_metrics.json").read_text())
    assert main(["eval", str(run)]) == 0
    report = json.loads((run / "eval" / "toy_metrics.json").read_text())
    for key in ("fd_generator", "fd_teacher_sampler"):  # same checkpoint, same refitted teacher: same numbers
        assert report[key] == trained[key], key
    assert report["step"] == 10 and report["teacher_sampler_steps"] == 5
    assert {"fd_generator", "fd_teacher_sampler", "fd_reference", "mode_coverage_tv", "num_samples"} <= set(report)
    assert (run / "eval" / "fd_generator.png").stat().st_size > 0


def test_generator_t_power_reaches_the_generator_phase_only(tmp_path, monkeypatch):
    tr = make(tmp_path, "objective.generator_t_power=4", "train.batch_size=4")
    schedule = tr.objective.schedule
    drawn, sample_t = [], schedule.sample_t

    def record(*args, **kw):
        t = sample_t(*args, **kw)
        drawn.append((args[5] if len(args) > 5 else kw.get("power", 1.0), t))
        return t

    losses = []
    monkeypatch.setattr(schedule, "sample_t", record)
    generator_loss = tr.objective.generator_loss
    monkeypatch.setattr(tr.objective, "generator_loss",
                        lambda *a, **kw: losses.append(a[4]) or generator_loss(*a, **kw))
    tr.train_step()
    # one fake-score draw at the papers' uniform, then the generator's at the configured power, whose t it uses
    assert [power for power, _ in drawn] == [1.0, 4.0]
    assert torch.equal(losses[0], drawn[1][1])
