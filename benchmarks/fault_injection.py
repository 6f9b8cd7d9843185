"""Fault injection on 2-rank runs: kill -9, a damaged newest checkpoint, SIGUSR1; does the resumed run end equal?

For each backend (fsdp2, ZeRO-3 by default) this runs the same small toy training on 2 gloo ranks:
  - once uninterrupted: the reference;
  - `--kills` times killed with SIGKILL (the whole torchrun process group, no handler runs) at a random moment,
    then run again with the same command until it finishes;
  - once stopped after a checkpoint, with the newest checkpoint damaged (a truncated file), then run again: it
    must set that checkpoint aside and resume from the previous one;
  - once sent SIGUSR1 (SLURM's preemption warning) mid-run: every rank checkpoints and exits 75, then run again.
Each finished run's generator weights and their EMA are compared bit for bit with the reference's.

    python benchmarks/fault_injection.py --kills 5 --out benchmarks/results/fault_injection.md

A measurement, not a test: its runtime depends on the machine, and the random kill moments are seeded (--seed).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bigsid.checkpoint import latest_checkpoint
from bigsid.export import load_generator_state

TOY = ["teacher.student_width=64", "teacher.student_depth=2", "teacher.student_fit_steps=200", "train.batch_size=32",
       "train.total_nimg=3200", "train.progress=false", "train.log_every=5", "train.sample_every=0",
       "train.checkpoint_every=10", "train.keep_checkpoints=2", "train.eval_every=0",
       "optim.lr_generator=1e-4", "optim.lr_fake_score=1e-4", "train.ema_halflife_nimg=500",
       "eval.num_samples=200", "eval.teacher_sampler_steps=5"]
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
            "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "ddp": ["parallel.backend=ddp"]}
FINAL_STEP = 3200 // 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: Path, backend: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "bigsid.cli", "train", "-", *TOY, *BACKENDS[backend],
           f"train.run_dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    log = open(run_dir.with_suffix(".log"), "ab")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it at once, as a node failure would (torchrun puts its workers
    in sessions of their own, so a process-group kill misses them)."""
    pids, frontier = [], [proc.pid]
    while frontier:
        pids += frontier
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True)
        frontier = [int(p) for p in children.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_to_end(run_dir: Path, backend: str) -> int:
    """Run (again) until the run finishes; the number of restarts it took."""
    for attempt in range(5):
        if start(run_dir, backend).wait() == 0:
            return attempt
    raise RuntimeError(f"{run_dir} did not finish; see {run_dir.with_suffix('.log')}")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Until the run has a complete checkpoint at `step` or later (or has ended)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        newest = latest_checkpoint(run_dir)
        if newest is not None and int(newest.name.split("-")[1]) >= step:
            return
        time.sleep(0.05)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint(run_dir)
    assert folder is not None and folder.name == f"step-{FINAL_STEP:09d}", folder
    raw, ema = load_generator_state(folder, ema=False), load_generator_state(folder, ema=True)
    return {**{f"raw.{k}": v for k, v in raw.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trial_kill(root: Path, backend: str, i: int, rng: random.Random, window: tuple[float, float]) -> dict:
    run_dir = root / f"{backend}-kill{i}"
    run_dir.mkdir()
    proc = start(run_dir, backend)
    delay = rng.uniform(*window)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
    at = latest_checkpoint(run_dir)
    restarts = run_to_end(run_dir, backend)
    return {"fault": f"kill -9 at {delay:.1f} s", "checkpoint_at_kill": at.name if at else "none",
            "restarts": restarts, "run_dir": run_dir}


def trial_damaged(root: Path, backend: str) -> dict:
    run_dir = root / f"{backend}-damaged"
    run_dir.mkdir()
    proc = start(run_dir, backend)
    wait_for_step(run_dir, 20, proc)
    kill_tree(proc)
    newest = latest_checkpoint(run_dir)
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".distcp", ".pt")),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    restarts = run_to_end(run_dir, backend)
    aside = newest.with_name(newest.name + ".damaged")
    return {"fault": f"{victim.relative_to(newest)} of {newest.name} truncated to half",
            "checkpoint_at_kill": newest.name, "restarts": restarts, "run_dir": run_dir,
            "set_aside": aside.is_dir()}


def trial_usr1(root: Path, backend: str) -> dict:
    run_dir = root / f"{backend}-usr1"
    run_dir.mkdir()
    proc = start(run_dir, backend)
    wait_for_step(run_dir, 10, proc)
    # the workers, as SLURM's --signal=USR1@... delivers it with srun's --signal (torchrun does not forward it)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in workers:
        os.kill(int(pid), signal.SIGUSR1)
    code = proc.wait()
    at = latest_checkpoint(run_dir)
    restarts = run_to_end(run_dir, backend)
    return {"fault": f"SIGUSR1 to both workers (exit {code})", "checkpoint_at_kill": at.name if at else "none",
            "restarts": restarts, "run_dir": run_dir}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["fsdp2", "zero3"], choices=sorted(BACKENDS))
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/fault_injection")
    ap.add_argument("--out", default="benchmarks/results/fault_injection.md")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=False)
    rows = []
    for backend in args.backends:
        ref_dir = root / f"{backend}-reference"
        ref_dir.mkdir()
        # kill moments fall while the reference trained: from just before its first checkpoint to its last
        began, proc = time.perf_counter(), start(ref_dir, backend)
        wait_for_step(ref_dir, 10, proc)
        first = time.perf_counter() - began
        wait_for_step(ref_dir, FINAL_STEP, proc)
        window = (0.9 * first, time.perf_counter() - began)
        if proc.wait() != 0:
            raise RuntimeError(f"the reference run failed; see {ref_dir.with_suffix('.log')}")
        reference = final_state(ref_dir)
        trials = [trial_kill(root, backend, i, rng, window) for i in range(args.kills)]
        trials += [trial_damaged(root, backend), trial_usr1(root, backend)]
        for t in trials:
            t["matches"] = same(final_state(t.pop("run_dir")), reference)
            rows.append({"backend": backend, **t})
            print(rows[-1], flush=True)
    matched = sum(r["matches"] for r in rows)
    lines = [
        "# Fault injection: resumed runs against the uninterrupted run",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, 2 gloo ranks "
        f"per run. Command: `python benchmarks/fault_injection.py --kills {args.kills} --seed {args.seed} "
        f"--backends {' '.join(args.backends)}`. A toy run of {FINAL_STEP} steps, a checkpoint every 10 steps "
        "(2 kept). `matches`: the final generator weights, its EMA bit-identical to the uninterrupted run's.",
        "",
        f"**{matched} of {len(rows)} resumed runs matched.**",
        "",
        "| backend | fault | newest checkpoint at the fault | restarts | damaged one set aside | matches |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['fault']} | {r['checkpoint_at_kill']} | {r['restarts']} | "
                     f"{ {True: 'yes', False: 'NO'}.get(r.get('set_aside'), '') } | "
                     f"{'yes' if r['matches'] else 'NO'} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{matched} of {len(rows)} matched; wrote {args.out}")


if __name__ == "__main__":
    main()
