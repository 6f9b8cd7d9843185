"""Checkpoints are parsed, never run, and verified before use: a damaged newest one is set aside for the previous.

The payload tests plant, in each file bigsid reads, a pickle that would create a file when unpickled, and update
the manifest to match, so what is tested is the reader itself and not the checksum in front of it."""

import os
import pickle
import shutil

import pytest
import torch

from bigsid import checkpoint
from bigsid.checkpoint import CheckpointError, complete_checkpoints
from bigsid.cli import main
from test_trainer import make


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_manifest(folder):
    """A manifest that matches the folder as it is now (what someone who planted a file could also write)."""
    names = checkpoint.files(folder)
    (folder / checkpoint.MANIFEST).write_text(__import__("json").dumps(checkpoint.digest(folder, names)))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with checkpoints at steps 5 and 10 (local backend)."""
    run = tmp_path_factory.mktemp("run")
    make(run, "train.total_nimg=320", "train.keep_checkpoints=3").run()
    assert [p.name for p in complete_checkpoints(run)] == ["step-000000005", "step-000000010"]
    return run


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_manifest_lists_every_file_with_size_and_checksum(two_checkpoints):
    folder = complete_checkpoints(two_checkpoints)[-1]
    manifest = __import__("json").loads((folder / checkpoint.MANIFEST).read_text())
    assert sorted(manifest) == checkpoint.files(folder)
    assert {"generator.safetensors", "generator.optim.pt", "ema.safetensors", checkpoint.STATE} <= set(manifest)
    assert all(manifest[n]["size"] == (folder / n).stat().st_size for n in manifest)
    assert checkpoint.verify(folder) == []
    # shares verified by two ranks together cover the whole manifest
    assert checkpoint.verify(folder, 0, 2) == checkpoint.verify(folder, 1, 2) == []


@pytest.mark.parametrize("damage", ["truncate", "replace"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(two_checkpoints, tmp_path, damage,
                                                                            caplog):
    run = copy_run(two_checkpoints, tmp_path / "run")
    newest = complete_checkpoints(run)[-1]
    if damage == "truncate":
        victim = newest / "generator.safetensors"
        victim.write_bytes(victim.read_bytes()[:-100])
    else:  # same size, other content: only the checksum can tell
        victim = newest / "fake_score.optim.pt"
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    resumed = make(run, "train.total_nimg=320", "train.keep_checkpoints=3")
    assert resumed.step == 5
    aside = newest.with_name(newest.name + ".damaged")
    assert aside.is_dir() and not newest.exists()
    assert victim.name in (aside / "DAMAGED.txt").read_text()
    assert victim.name in caplog.text and newest.name in caplog.text
    # what was there is kept: nothing deleted, the damaged file still in the set-aside folder
    assert (aside / victim.name).is_file()


def test_no_usable_checkpoint_is_refused_with_the_files_named_and_nothing_deleted(two_checkpoints, tmp_path, capsys):
    run = copy_run(two_checkpoints, tmp_path / "run")
    for folder in complete_checkpoints(run):
        (folder / "ema.safetensors").write_bytes(b"")
    from conftest import TINY_TOY

    # exit 2 (bad input): the SLURM scripts requeue only on 75, so a job with nothing to resume fails
    assert main(["train", "-", *TINY_TOY, f"train.run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "ema.safetensors" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000005.damaged",
                                                                       "step-000000010.damaged"]


def test_readers_that_must_not_change_a_run_skip_a_damaged_checkpoint_in_place(two_checkpoints, tmp_path):
    run = copy_run(two_checkpoints, tmp_path / "run")
    newest = complete_checkpoints(run)[-1]
    (newest / "generator.safetensors").write_bytes(b"x")
    assert checkpoint.newest_usable(run) == complete_checkpoints(run)[0]
    assert newest.is_dir()  # left where it is
    with pytest.raises(CheckpointError, match="generator.safetensors"):
        checkpoint.newest_usable(newest)  # named directly: refused, not replaced by another


LOCAL_FILES = ["generator.safetensors", "generator.optim.pt", "fake_score.safetensors", "fake_score.optim.pt",
               "ema.safetensors", "rank0.safetensors", checkpoint.STATE]


@pytest.mark.parametrize("name", LOCAL_FILES)
def test_a_planted_pickle_never_runs_on_resume_and_the_file_is_named(two_checkpoints, tmp_path, name):
    run = copy_run(two_checkpoints, tmp_path / "run")
    for folder in complete_checkpoints(run)[:-1]:
        shutil.rmtree(folder)  # no older checkpoint to fall back to: the reader itself must refuse
    folder = complete_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), folder / name)
    rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        make(run)
    assert not marker.exists()


def test_a_planted_manifest_is_damage_not_code(two_checkpoints, tmp_path):
    run = copy_run(two_checkpoints, tmp_path / "run")
    marker = tmp_path / "pwned"
    newest = complete_checkpoints(run)[-1]
    (newest / checkpoint.MANIFEST).write_bytes(pickle.dumps(Payload(marker)))
    assert make(run).step == 5
    assert not marker.exists()
    assert checkpoint.MANIFEST in (newest.with_name(newest.name + ".damaged") / "DAMAGED.txt").read_text()


@pytest.fixture()
def dcp_folder(tmp_path):
    """A DCP checkpoint shaped like the fsdp2 backend's: weights, Adam states with non-tensor hyper-parameters."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict

    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    model, optim = get_state_dict(net, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"generator": {"model": model, "optim": optim}}, checkpoint_id=str(tmp_path / "dcp"),
                 no_dist=True)
    return tmp_path / "dcp", (net, opt)


def load_into_fresh(folder):
    import warnings

    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from bigsid.parallel.fsdp2 import load_dcp

    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = torch.optim.Adam(net.parameters(), lr=5.0)
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    model, optim = get_state_dict(net, opt)
    state = {"generator": {"model": model, "optim": optim}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp(state, folder, no_dist=True)
    return state


def test_the_safe_dcp_reader_loads_what_dcp_wrote(dcp_folder):
    folder, (net, opt) = dcp_folder
    state = load_into_fresh(folder)
    for k, v in net.state_dict().items():
        assert torch.equal(state["generator"]["model"][k], v)
    assert state["generator"]["optim"]["param_groups"][0]["lr"] == 1e-3  # a non-tensor item, read as data


def test_a_planted_dcp_metadata_pickle_never_runs(dcp_folder, tmp_path):
    folder, _ = dcp_folder
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        load_into_fresh(folder)
    assert not marker.exists()


def test_a_planted_dcp_data_file_never_runs(dcp_folder, tmp_path):
    folder, _ = dcp_folder
    marker = tmp_path / "pwned"
    for data in folder.glob("*.distcp"):
        data.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.distcp"):
        load_into_fresh(folder)
    assert not marker.exists()


def test_a_non_tensor_dcp_item_is_read_without_running_code(tmp_path):
    """DCP's default planner would torch.load(weights_only=False) this item and run it."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from bigsid.parallel.fsdp2 import load_dcp

    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"w": torch.zeros(2), "hyper": Payload(marker)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
        with pytest.raises(CheckpointError, match=r"\.distcp"):
            load_dcp({"w": torch.ones(2), "hyper": None}, tmp_path / "dcp", no_dist=True)
    assert not marker.exists()


def test_deepspeed_files_are_read_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from bigsid.parallel.deepspeed import _read_ds, _safe_checkpoint_engine

    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(Payload(marker), path)
    # DeepSpeed's loader (the same number of ranks), and bigsid's memory-mapped reader of ZeRO partitions (another)
    for read in (_safe_checkpoint_engine(None).load, lambda path: _read_ds(path, mmap=True)):
        with pytest.raises(CheckpointError, match="mp_rank_00_model_states"):
            read(str(path))
    assert not marker.exists()


def test_a_step_written_again_keeps_a_usable_copy_through_a_crash(two_checkpoints, tmp_path, monkeypatch):
    """A finished run restarted writes its last step again: until the new copy is in place the old one stays
    complete (set aside), and resume finds it; the next commit of that step clears it away."""
    import json
    from pathlib import Path

    run = copy_run(two_checkpoints, tmp_path / "run")
    old = complete_checkpoints(run)[-1]
    state = json.loads((old / checkpoint.STATE).read_text())
    partial = checkpoint.begin(run, 10)
    shutil.copy(old / "generator.safetensors", partial)
    rename = Path.rename

    def crash_on_the_new_copy(self, target):
        if self.name.endswith(".partial"):
            raise OSError("killed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_new_copy)
    with pytest.raises(OSError):
        checkpoint.commit(partial, state, keep=3)
    monkeypatch.setattr(Path, "rename", rename)
    assert [p.name for p in complete_checkpoints(run)] == ["step-000000005", "step-000000010.replaced"]
    assert make(run, "train.total_nimg=320", "train.keep_checkpoints=3").step == 10
    partial = checkpoint.begin(run, 10)
    shutil.copy(old.with_suffix(".replaced") / "generator.safetensors", partial)
    checkpoint.commit(partial, state, keep=3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000005", "step-000000010"]


@pytest.mark.parametrize("key,value,advice", [("parallel", {"backend": "fsdp2"}, "parallel.backend=fsdp2"),
                                              ("train", {"batch_size": 64}, "train.batch_size=64")])
def test_resume_under_another_backend_layout_or_batch_says_what_to_set(two_checkpoints, tmp_path, key, value, advice):
    import json

    run = copy_run(two_checkpoints, tmp_path / "run")
    newest = complete_checkpoints(run)[-1]
    state = json.loads((newest / checkpoint.STATE).read_text())
    state["config"][key] |= value
    (newest / checkpoint.STATE).write_text(json.dumps(state))
    rewrite_manifest(newest)
    with pytest.raises(CheckpointError, match=advice):
        make(run, "train.total_nimg=320", "train.keep_checkpoints=3")
    assert newest.is_dir()  # refused, not set aside: the checkpoint is sound


def test_the_run_of_skipped_steps_carries_over_a_resume(tmp_path):
    """max_consecutive_skips counts skipped steps in a row across a preemption as without one."""
    tr = make(tmp_path, "train.checkpoint_every=0")
    tr.skip_run.fill_(2)
    tr.save_checkpoint()
    assert int(make(tmp_path, "train.checkpoint_every=0").skip_run) == 2
