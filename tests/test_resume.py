"""kill -9 at an arbitrary moment, then the same command again: the run resumes and ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from bigsid.checkpoint import complete_checkpoints, latest_checkpoint
from conftest import TINY_TOY

ARGS = [*TINY_TOY, "train.total_nimg=9600", "train.checkpoint_every=4", "train.keep_checkpoints=2"]


def command(run_dir):
    return [sys.executable, "-m", "bigsid.cli", "train", "-", *ARGS, f"train.run_dir={run_dir}"]


def test_kill_9_then_rerun_matches_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(complete_checkpoints(tmp_path / "killed")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler, no clean-up: whatever was being written stays half-written
    proc.wait()
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and killed_at.name != "step-000000300", "killed before the end"
    subprocess.run(command(tmp_path / "killed"), check=True, env=env, capture_output=True)
    final = latest_checkpoint(tmp_path / "killed")
    assert final.name == latest_checkpoint(tmp_path / "full").name == "step-000000300"
    before_last = complete_checkpoints(tmp_path / "full")[-2]  # keep_checkpoints=2: four steps earlier
    for name in ("generator", "fake_score", "ema"):
        a = load_file(latest_checkpoint(tmp_path / "full") / f"{name}.safetensors")
        b = load_file(final / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        # equal bits prove little of runs that stopped moving: the last steps changed these weights
        earlier = load_file(before_last / f"{name}.safetensors")
        assert any(not torch.equal(a[k], earlier[k]) for k in a), name
    # metrics.jsonl: the rows of the steps redone after the kill appear once, as in the uninterrupted run
    rows = lambda run: [(r["step"], r.get("generator/loss"), r.get("eval/fd_generator"))
                        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert rows(tmp_path / "killed") == rows(tmp_path / "full")
